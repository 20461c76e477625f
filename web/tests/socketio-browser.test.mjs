// A headless Chromium page whose WebSocket constructor is gone (a proxy that breaks
// WebSockets, which the seeds had to live with): socket.io-client falls back to long-polling and
// chats with a plain /ws user (PROTOCOL §7).
//
// Needs: target/debug/switchboard, /usr/bin/chromium, the npm packages (scripts/test.sh).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, register, api, Ws } from './sio-helpers.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CLIENT_BUNDLE = join(here, 'node_modules', 'socket.io-client', 'dist', 'socket.io.min.js');
let browser;

after(async () => {
  await browser?.close();
});

test('headless Chromium without WebSocket falls back to polling and chats with a /ws user', async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  const base = await startServer();
  const [a, b] = [await register(base), await register(base)];
  const chat = (await api(base, a.token, 'POST', '/api/chats', { participantIds: [b.id] })).body.chat.id;
  browser ??= await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  const page = await browser.newPage();
  // No WebSocket in this page: a proxy that breaks WebSockets, as the seeds had to live with.
  await page.addInitScript(() => {
    delete window.WebSocket;
    window.WebSocket = undefined;
  });
  await page.goto(base);
  await page.addScriptTag({ path: CLIENT_BUNDLE });
  const wb = await Ws.open(base, b.token);
  const result = page.evaluate(
    async ({ base, token, chat }) => {
      const socket = window.io(base, { auth: { token: `Bearer ${token}` }, reconnection: false });
      const seen = [];
      const reply = new Promise((resolve) => socket.on('message', (m) => m.content === 'pong from /ws' && resolve(m)));
      await new Promise((resolve, reject) => {
        socket.on('connect', resolve);
        socket.on('connect_error', reject);
      });
      const ack = await socket.timeout(8000).emitWithAck('send-message', { chatId: chat, content: 'ping from chromium' });
      const back = await reply;
      seen.push(socket.io.engine.transport.name);
      socket.disconnect();
      return { ack, back, transport: seen[0], hasWebSocket: typeof window.WebSocket };
    },
    { base, token: a.token, chat },
  );
  assert.equal((await wb.push('message')).content, 'ping from chromium');
  await wb.request('message', { chatId: chat, content: 'pong from /ws' });
  const r = await result;
  assert.equal(r.hasWebSocket, 'undefined');
  assert.equal(r.transport, 'polling');
  assert.equal(r.ack.success, true);
  assert.equal(r.back.content, 'pong from /ws');
  wb.socket.close();
});
