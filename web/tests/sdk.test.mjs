// Unit tests of the SDK's client logic (node --test): backoff, close codes, cursors, the
// outgoing queue, and the reconnect/sync/flush cycle against a scripted fake WebSocket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backoffDelay, closeAction, Cursors, OutgoingQueue, Switchboard, mediaError } from '../sdk/switchboard.js';

test('backoff grows exponentially, is capped at 15 s, and is jittered', () => {
  assert.equal(backoffDelay(0, { random: () => 0.999999 }), 499);
  assert.equal(backoffDelay(3, { random: () => 0.999999 }), 3999);
  assert.equal(backoffDelay(10, { random: () => 0.999999 }), 14999);
  assert.equal(backoffDelay(1000, { random: () => 0.999999 }), 14999);
  assert.equal(backoffDelay(5, { random: () => 0 }), 0);
  const samples = new Set(Array.from({ length: 50 }, () => backoffDelay(4)));
  assert.ok(samples.size > 10, 'jitter spreads reconnects');
  for (const d of samples) assert.ok(d >= 0 && d < 8000);
});

test('close codes decide reconnect, refresh or stop', () => {
  for (const c of [1001, 1006, 1011, 1012, 4408, 4429]) assert.equal(closeAction(c), 'reconnect', String(c));
  assert.equal(closeAction(1000), 'stop');
  assert.equal(closeAction(1009), 'stop');
  assert.equal(closeAction(4401), 'refresh');
});

test('cursors accept each seq once and persist', () => {
  const store = new Map();
  const storage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v) };
  const c = new Cursors(storage);
  assert.equal(c.accept({ chatId: 'a', seq: 1 }), true);
  assert.equal(c.accept({ chatId: 'a', seq: 1 }), false, 'duplicate');
  assert.equal(c.accept({ chatId: 'a', seq: 3 }), true);
  assert.equal(c.accept({ chatId: 'a', seq: 2 }), false, 'older than the cursor');
  assert.deepEqual(new Cursors(storage).snapshot(), { a: 3 }, 'survives a reload');
});

test('the outgoing queue sends in order and keeps what failed', async () => {
  const q = new OutgoingQueue();
  const done = [];
  for (const n of [1, 2, 3]) q.push({ content: `m${n}`, resolve: (m) => done.push(m), reject: () => {} });
  let fail = true;
  const sent = [];
  const send = async (item) => {
    if (item.content === 'm2' && fail) throw Object.assign(new Error('offline'), { retryable: true });
    sent.push(item.content);
    return item.content;
  };
  assert.equal(await q.flush(send), false);
  assert.deepEqual(sent, ['m1']);
  assert.equal(q.length, 2);
  fail = false;
  assert.equal(await q.flush(send), true);
  assert.deepEqual(sent, ['m1', 'm2', 'm3']);
  assert.deepEqual(done, ['m1', 'm2', 'm3']);
});

test('one flush at a time, and the reason it stopped', async () => {
  const q = new OutgoingQueue();
  let release;
  const gate = new Promise((r) => { release = r; });
  q.push({ content: 'a', resolve: () => {}, reject: () => {} });
  const first = q.flush(async () => { await gate; return 'a'; });
  q.push({ content: 'b', resolve: () => {}, reject: () => {} });
  assert.equal(await q.flush(async () => 'x'), false, 'a second flush does not run beside the first');
  release();
  assert.equal(await first, true, 'the running flush sent what was queued meanwhile');
  assert.equal(q.length, 0);
  q.push({ content: 'c', resolve: () => {}, reject: () => {} });
  const limited = Object.assign(new Error('slow down'), { retryable: true, code: 'rate_limited' });
  assert.equal(await q.flush(async () => { throw limited; }), false);
  assert.equal(q.lastError, limited);
  assert.equal(q.length, 1);
});

test('media errors map to clear reasons', () => {
  assert.equal(mediaError({ name: 'NotFoundError' }).reason, 'no-device');
  assert.equal(mediaError({ name: 'NotAllowedError' }).reason, 'permission-denied');
  assert.equal(mediaError({ name: 'NotReadableError' }).reason, 'in-use');
});

/** A WebSocket whose server side the test scripts. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 1;
    this.sent = [];
    FakeSocket.all.push(this);
    FakeSocket.onCreate?.(this, FakeSocket.all.length - 1);
    // Greets on the next turn, so the test can script the server first.
    setTimeout(() => this.push('connection:established', { userId: 'u1', iceServers: [] }), 1);
  }
  send(text) {
    const frame = JSON.parse(text);
    this.sent.push(frame);
    this.onsend?.(frame);
  }
  push(event, data) {
    this.onmessage?.({ data: JSON.stringify({ event, data }) });
  }
  reply(id, data) {
    this.onmessage?.({ data: JSON.stringify({ event: 'reply', id, ok: true, data }) });
  }
  close(code = 1000) {
    this.readyState = 3;
    this.onclose?.({ code });
  }
}

const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));

function client(extra = {}, chatsPerSocket = []) {
  FakeSocket.all = [];
  FakeSocket.onCreate = (sock, n) => autoServer(sock, chatsPerSocket[n] ?? []);
  return new Switchboard({
    url: 'ws://x/ws',
    getToken: () => 'tok',
    WebSocket: FakeSocket,
    backoff: { baseMs: 1, maxMs: 2 },
    pingIntervalMs: 60000,
    ...extra,
  });
}

/** Answers `sync` with `chats` and `message` with a stored message. */
function autoServer(sock, chats = []) {
  let seq = 10;
  sock.onsend = (f) => {
    if (f.event === 'sync') queueMicrotask(() => sock.reply(f.id, { chats }));
    if (f.event === 'message') {
      seq += 1;
      const m = { id: `m${seq}`, chatId: f.data.chatId, seq, content: f.data.content, clientMsgId: f.data.clientMsgId };
      queueMicrotask(() => sock.reply(f.id, { message: m }));
    }
  };
}

test('after every (re)connect it syncs from its cursors, delivering each message once', async () => {
  const sb = client({}, [
    [{ chatId: 'c', messages: [{ chatId: 'c', seq: 1 }, { chatId: 'c', seq: 2 }], hasMore: false }],
    [{ chatId: 'c', messages: [{ chatId: 'c', seq: 4 }], hasMore: false }],
  ]);
  const got = [];
  sb.on('message', (m) => got.push(`${m.chatId}:${m.seq}`));
  const statuses = [];
  sb.on('status', ({ status }) => statuses.push(status));
  await sb.connect();
  await tick();
  assert.equal(sb.status, 'connected');
  FakeSocket.all[0].push('message', { chatId: 'c', seq: 2 }); // a duplicate push
  FakeSocket.all[0].push('message', { chatId: 'c', seq: 3 });
  FakeSocket.all[0].close(1006);
  assert.equal(sb.status, 'reconnecting');
  await tick(20);
  const second = FakeSocket.all[1];
  assert.ok(second, 'reconnected after a network drop');
  const sync = second.sent.find((f) => f.event === 'sync');
  assert.deepEqual(sync.data.cursors, { c: 3 }, 'sync from the stored cursor');
  assert.deepEqual(got, ['c:1', 'c:2', 'c:3', 'c:4']);
  assert.deepEqual(statuses, ['connecting', 'connected', 'reconnecting', 'connected']);
  sb.close();
});

test('messages typed while disconnected go out in order after the reconnect, once each', async () => {
  const sb = client();
  await sb.connect();
  await tick();
  FakeSocket.all[0].close(1012);
  const sends = [sb.sendMessage('c', 'one'), sb.sendMessage('c', 'two'), sb.sendMessage('c', 'three')];
  assert.equal(sb.queue.length, 3);
  const stored = await Promise.all(sends);
  assert.deepEqual(stored.map((m) => m.content), ['one', 'two', 'three']);
  const frames = FakeSocket.all[1].sent.filter((f) => f.event === 'message');
  assert.deepEqual(frames.map((f) => f.data.content), ['one', 'two', 'three']);
  assert.equal(new Set(frames.map((f) => f.data.clientMsgId)).size, 3, 'each with its own clientMsgId');
  sb.close();
});

test('1000 stays closed; 4401 refreshes the token and never loops on the same one', async () => {
  const sb = client();
  await sb.connect();
  await tick();
  sb.close();
  await tick(20);
  assert.equal(FakeSocket.all.length, 1, 'no reconnect after a normal close');
  assert.equal(sb.status, 'disconnected');

  let token = 'old';
  let refreshes = 0;
  const sb2 = client({ getToken: () => token, refreshToken: async () => { refreshes += 1; token = 'new'; return token; } });
  await sb2.connect();
  await tick();
  FakeSocket.all[0].close(4401);
  await tick(20);
  assert.equal(refreshes, 1);
  assert.ok(FakeSocket.all[1].url.endsWith('token=new'), FakeSocket.all[1].url);

  const sb3 = client({ refreshToken: async () => 'tok' }); // the refresher gives the same token back
  let failed = false;
  sb3.on('auth-failed', () => (failed = true));
  await sb3.connect();
  await tick();
  FakeSocket.all[0].close(4401);
  await tick(20);
  assert.equal(failed, true);
  assert.equal(FakeSocket.all.length, 1, 'no reconnect with the same token');
  sb2.close();
});

test('requests time out and fail when the connection drops', async () => {
  const sb = client({ requestTimeoutMs: 10 });
  await sb.connect();
  await tick();
  await assert.rejects(sb.request('users:list'), (e) => e.code === 'timeout');
  const pending = sb.request('users:list', {}, { timeoutMs: 1000 });
  FakeSocket.all[0].close(1006);
  await assert.rejects(pending, (e) => e.code === 'disconnected');
  sb.close();
});
