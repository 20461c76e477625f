// Headless Chromium calls relayed through the embedded TURN server over TCP and over TLS on the
// shared HTTPS port: each page gets *only* that one TURN URL (from the server's own ICE list),
// iceTransportPolicy 'relay', and a fake camera; the call must connect relay-to-relay over that
// protocol and media must flow.
//
// Needs: target/debug/switchboard, /usr/bin/chromium, openssl, playwright-core (scripts/test.sh).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { chromium } from 'playwright-core';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.SWITCHBOARD_BIN || join(root, 'target', 'debug', 'switchboard');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
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

const servers = [];
let browser;

after(async () => {
  await browser?.close();
  for (const s of servers) s.kill('SIGTERM');
});

/** A server with `env` on fresh ports; resolves with its base URL once ready. */
async function startServer(env, https) {
  const dir = mkdtempSync(join(tmpdir(), 'sb-turn-'));
  const httpPort = await freePort();
  const extra = {};
  if (https) {
    const cert = join(dir, 'cert.pem');
    const key = join(dir, 'key.pem');
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-days', '2', '-subj', '/CN=localhost',
      '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
      '-addext', 'basicConstraints=critical,CA:FALSE', '-addext', 'extendedKeyUsage=serverAuth',
      '-keyout', key, '-out', cert,
    ], { stdio: 'ignore' });
    extra.SWITCHBOARD_HTTP__TLS_CERT_FILE = cert;
    extra.SWITCHBOARD_HTTP__TLS_KEY_FILE = key;
  }
  const server = spawn(BIN, [], {
    env: {
      ...process.env,
      SWITCHBOARD_DATA_DIR: join(dir, 'data'),
      SWITCHBOARD_HTTP__LISTEN: `127.0.0.1:${httpPort}`,
      SWITCHBOARD_TURN__LISTEN_UDP: `127.0.0.1:${await freePort()}`,
      ...extra,
      ...env,
    },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  servers.push(server);
  const base = `${https ? 'https' : 'http'}://127.0.0.1:${httpPort}`;
  // The test's own requests trust the throwaway certificate.
  if (https) process.env.NODE_TLS_REJECT_UNAUTHORIZED = '0';
  for (let i = 0; i < 200; i++) {
    try {
      const r = await fetch(`${base}/readyz`);
      if (r.ok) return { base, httpPort };
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('server did not become ready');
}

/** A user's ICE servers, cut down to the one TURN URL `pick` chooses. */
async function onlyOneUrl(base, pick) {
  const reg = await fetch(`${base}/api/auth/register`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username: `u${Date.now()}`, password: 'password123' }),
  }).then((r) => r.json());
  const ice = await fetch(`${base}/api/ice-servers`, {
    headers: { authorization: `Bearer ${reg.accessToken}` },
  }).then((r) => r.json());
  const turn = ice.iceServers.find((s) => s.username);
  const url = turn.urls.find(pick);
  assert.ok(url, `no such URL in ${JSON.stringify(turn.urls)}`);
  return [{ urls: [url], username: turn.username, credential: turn.credential }];
}

async function page(base) {
  browser ??= await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--ignore-certificate-errors',
    ],
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  await context.grantPermissions(['camera', 'microphone']);
  const p = await context.newPage();
  await p.goto(base);
  return p;
}

/** Two relay-only peers in the page, a fake camera from one to the other; what flowed. */
function relayCall(p, iceServers) {
  return p.evaluate(async (iceServers) => {
    const config = { iceServers, iceTransportPolicy: 'relay' };
    const a = new RTCPeerConnection(config);
    const b = new RTCPeerConnection(config);
    a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
    b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
    const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
    for (const t of stream.getTracks()) a.addTrack(t, stream);
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`not connected: ${b.connectionState}`)), 30000);
      const check = () => {
        if (b.connectionState === 'connected') {
          clearTimeout(timer);
          resolve();
        } else if (b.connectionState === 'failed') {
          clearTimeout(timer);
          reject(new Error('connection failed'));
        }
      };
      b.onconnectionstatechange = check;
      check();
    });
    const sample = async (pc) => {
      const stats = await pc.getStats();
      let pair;
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
      });
      const local = stats.get(pair.localCandidateId);
      const remote = stats.get(pair.remoteCandidateId);
      return {
        bytesReceived: pair.bytesReceived,
        local: local.candidateType,
        remote: remote.candidateType,
        relayProtocol: local.relayProtocol,
      };
    };
    const first = await sample(b);
    await new Promise((r) => setTimeout(r, 2000));
    const later = await sample(b);
    const sender = await sample(a);
    a.close();
    b.close();
    for (const t of stream.getTracks()) t.stop();
    return { first, later, sender };
  }, iceServers);
}

function assertRelayed(result, protocol) {
  for (const s of [result.later, result.sender]) {
    assert.equal(s.local, 'relay', JSON.stringify(result));
    assert.equal(s.remote, 'relay', JSON.stringify(result));
    assert.equal(s.relayProtocol, protocol, JSON.stringify(result));
  }
  assert.ok(
    result.later.bytesReceived > result.first.bytesReceived,
    `media flows: ${result.first.bytesReceived} -> ${result.later.bytesReceived}`,
  );
}

test('a call with only a turn:…?transport=tcp URL connects relay to relay over TCP', async () => {
  const { base } = await startServer({
    SWITCHBOARD_TURN__LISTEN_TCP: `127.0.0.1:${await freePort()}`,
    SWITCHBOARD_TURN__RELAY_PORTS: '46000-46499',
  }, false);
  const iceServers = await onlyOneUrl(base, (u) => u.startsWith('turn:') && u.endsWith('?transport=tcp'));
  const result = await relayCall(await page(base), iceServers);
  assertRelayed(result, 'tcp');
});

test('a call with only a turns: URL on the shared HTTPS port connects over TLS', async () => {
  const { base, httpPort } = await startServer({
    SWITCHBOARD_TURN__RELAY_PORTS: '46500-46999',
  }, true);
  const iceServers = await onlyOneUrl(base, (u) => u === `turns:127.0.0.1:${httpPort}?transport=tcp`);
  const p = await page(base);
  const result = await relayCall(p, iceServers);
  assertRelayed(result, 'tls');
  // The same port still serves the web app.
  assert.equal(await p.evaluate(() => fetch('/healthz').then((r) => r.text())), 'ok');
});
