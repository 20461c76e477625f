// Browser end-to-end tests: the real binary, headless Debian Chromium driven by playwright-core,
// fake camera and microphone, media forced through the embedded TURN server (relay only).
//
// Needs: target/debug/switchboard (built by scripts/test.sh), /usr/bin/chromium and
// playwright-core (installed by scripts/test.sh). Missing pieces fail the test.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, existsSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { chromium } from 'playwright-core';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.SWITCHBOARD_BIN || join(root, 'target', 'debug', 'switchboard');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = join(root, 'docs', 'screenshots');

assert.ok(existsSync(BIN), `${BIN} is missing: cargo build first (scripts/test.sh does)`);
assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does)`);

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const dataDir = mkdtempSync(join(tmpdir(), 'sb-e2e-'));
let httpPort;
let turnPort;
let server;

/** Starts the server (again) on the same data dir and ports; resolves when it serves. */
async function startServer() {
  server = spawn(BIN, [], {
    env: {
      ...process.env,
      SWITCHBOARD_DATA_DIR: dataDir,
      SWITCHBOARD_HTTP__LISTEN: `127.0.0.1:${httpPort}`,
      SWITCHBOARD_TURN__LISTEN_UDP: `127.0.0.1:${turnPort}`,
      SWITCHBOARD_TURN__RELAY_PORTS: '44000-44999',
      SWITCHBOARD_PRESENCE__OFFLINE_GRACE: '1s',
    },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  for (let i = 0; i < 200; i++) {
    try {
      const r = await fetch(`http://127.0.0.1:${httpPort}/readyz`);
      if (r.ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('server did not become ready');
}

async function stopServer() {
  const exited = new Promise((r) => server.once('exit', r));
  server.kill('SIGTERM');
  await exited;
}

let browser;
const pages = {};

before(async () => {
  httpPort = await freePort();
  turnPort = await freePort();
  await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
    ],
  });
  mkdirSync(SHOTS, { recursive: true });
});

after(async () => {
  await browser?.close();
  if (server && server.exitCode === null) await stopServer();
});

async function newUser(name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  await context.grantPermissions(['camera', 'microphone']);
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[${name}] page error:`, e.message));
  await page.goto(`http://127.0.0.1:${httpPort}/?relay=1`);
  await page.fill('#username', name);
  await page.fill('#password', 'password123');
  await page.fill('#display-name', name[0].toUpperCase() + name.slice(1));
  await page.click('#register');
  await page.waitForSelector('#main:not(.hidden)');
  await page.waitForFunction(() => document.querySelector('[data-testid=conn-status]').textContent === 'connected');
  pages[name] = page;
  return page;
}

/** Waits until the element with this test id carries (or lost) the `hidden` class. */
function waitHidden(page, testid, hidden = true, timeout = 30000) {
  return page.waitForFunction(
    ([id, want]) => document.querySelector(`[data-testid=${id}]`).classList.contains('hidden') === want,
    [testid, hidden],
    { timeout },
  );
}

async function openChatWith(page, username) {
  await page.click(`[data-testid=contacts] li[data-user="${username}"]`);
  await page.waitForSelector('#chat-inner:not(.hidden)');
}

test('two users chat, see typing, and get delivered then read ticks', async () => {
  const alice = await newUser('alice');
  const bob = await newUser('bob');
  await alice.reload();
  await alice.waitForFunction(() => document.querySelector('[data-testid=conn-status]').textContent === 'connected');
  await openChatWith(alice, 'bob');
  await alice.fill('[data-testid=composer]', 'hello bob');
  await alice.press('[data-testid=composer]', 'Enter');
  // Bob is online, so it is delivered at once.
  await alice.waitForSelector('.msg.mine [data-status=delivered], .msg.mine [data-status=read]');
  await bob.reload();
  await bob.waitForFunction(() => document.querySelector('[data-testid=conn-status]').textContent === 'connected');
  await openChatWith(bob, 'alice');
  await bob.waitForSelector('.msg >> text=hello bob');
  // Bob opened the chat: Alice's tick turns to read.
  await alice.waitForSelector('.msg.mine [data-status=read]');
  // Typing, both ways of ending it.
  await bob.type('[data-testid=composer]', 'hi al');
  await waitHidden(alice, 'typing', false);
  await bob.press('[data-testid=composer]', 'Enter');
  await alice.waitForSelector('.msg >> text=hi al');
  await waitHidden(alice, 'typing');
  await alice.screenshot({ path: join(SHOTS, 'chat.png') });
});

async function selectedPair(page) {
  return page.evaluate(async () => {
    const pc = window.switchboard.calls.pc;
    if (!pc) return null;
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach((r) => {
      if (r.type === 'transport' && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
    });
    if (!pair) stats.forEach((r) => { if (r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded') pair = r; });
    if (!pair) return null;
    return {
      local: stats.get(pair.localCandidateId)?.candidateType,
      remote: stats.get(pair.remoteCandidateId)?.candidateType,
      bytesReceived: pair.bytesReceived,
      state: pc.connectionState,
    };
  });
}

test('a video call relayed through the embedded TURN server, and a third caller hears busy', async () => {
  const alice = pages.alice;
  const bob = pages.bob;
  await alice.click('[data-testid=video-call]');
  await bob.waitForSelector('[data-testid=accept]:not(.hidden)');
  await bob.click('[data-testid=accept]');
  for (const p of [alice, bob]) {
    await p.waitForFunction(() => document.querySelector('[data-testid=call]').dataset.state === 'active', null, { timeout: 30000 });
  }
  const first = { alice: await selectedPair(alice), bob: await selectedPair(bob) };
  for (const [who, pair] of Object.entries(first)) {
    assert.ok(pair, `${who} has a selected candidate pair`);
    assert.equal(pair.local, 'relay', `${who}: local candidate is relay`);
    assert.equal(pair.remote, 'relay', `${who}: remote candidate is relay`);
  }
  await new Promise((r) => setTimeout(r, 2000));
  for (const [who, p] of [['alice', alice], ['bob', bob]]) {
    const later = await selectedPair(p);
    assert.ok(later.bytesReceived > first[who].bytesReceived, `${who}: bytesReceived grows (${first[who].bytesReceived} -> ${later.bytesReceived})`);
  }
  await bob.screenshot({ path: join(SHOTS, 'call.png') });

  // Carol calls Bob during the call: the busy dialog.
  const carol = await newUser('carol');
  await openChatWith(carol, 'bob');
  await carol.click('[data-testid=audio-call]');
  await carol.waitForSelector('[data-testid=dialog][open]');
  assert.match(await carol.textContent('[data-testid=dialog-text]'), /busy/i);
  await carol.click('[data-testid=dialog] button');

  await alice.click('[data-testid=hangup]');
  await bob.waitForFunction(() => document.querySelector('[data-testid=call]').classList.contains('hidden'));
  // The call shows up in the history.
  await alice.waitForSelector('.msg.call >> text=Video call');
});

test('a server restart mid-chat: banner, reconnect, and the message typed meanwhile arrives once', async () => {
  const alice = pages.alice;
  const bob = pages.bob;
  // Close any call-ended dialog left open.
  for (const p of [alice, bob]) {
    if (await p.isVisible('[data-testid=dialog][open]')) await p.click('[data-testid=dialog] button');
  }
  await stopServer();
  await waitHidden(alice, 'banner', false);
  await alice.fill('[data-testid=composer]', 'sent while the server was down');
  await alice.press('[data-testid=composer]', 'Enter');
  await startServer();
  await waitHidden(alice, 'banner');
  await waitHidden(bob, 'banner');
  await bob.waitForSelector('.msg >> text=sent while the server was down', { timeout: 30000 });
  await new Promise((r) => setTimeout(r, 1000));
  const count = await bob.locator('.msg', { hasText: 'sent while the server was down' }).count();
  assert.equal(count, 1, 'delivered exactly once');
  const mine = await alice.locator('.msg', { hasText: 'sent while the server was down' }).count();
  assert.equal(mine, 1);
});
