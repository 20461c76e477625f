// Socket.IO compatibility (PROTOCOL §7) with the real socket.io-client 4.8 from npm against the
// real server: the websocket and polling transports and the upgrade, handshake auth, every chat
// event and a whole call with acks, the seeds' older events, a Socket.IO user and a /ws user
// talking both ways, long content over polling, and the same connection cap and rate limits
// as on /ws. (socketio-browser.test.mjs: a headless Chromium page that falls back to polling.)
//
// Needs: target/debug/switchboard and the npm packages (scripts/test.sh).
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, register, api, Sio, sio, Ws, WAIT } from './sio-helpers.mjs';

let base;
before(async () => {
  base = await startServer();
});

for (const [name, transports] of [
  ['websocket only', ['websocket']],
  ['polling only', ['polling']],
  ['polling, then the upgrade to websocket', ['polling', 'websocket']],
]) {
  test(`messages with acks over ${name}`, async () => {
    const [a, b] = [await register(base), await register(base)];
    const chat = (await api(base, a.token, 'POST', '/api/chats', { participantIds: [b.id] })).body.chat.id;
    const sa = await sio(base, a.token, { transports });
    const sb = await sio(base, b.token, { transports });
    const hello = await sa.next('connection:established');
    assert.equal(hello.userId, a.id);
    assert.deepEqual(await sa.next('connected'), { userId: a.id }, 'the older greeting too');
    if (transports.length === 2) {
      const deadline = Date.now() + WAIT;
      while (sa.socket.io.engine.transport.name !== 'websocket') {
        assert.ok(Date.now() < deadline, 'upgraded to websocket');
        await new Promise((r) => setTimeout(r, 50));
      }
    } else {
      assert.equal(sa.socket.io.engine.transport.name, transports[0]);
    }
    const ack = await sa.ack('message', { chatId: chat, content: 'hi', clientMsgId: `c-${name}` });
    assert.equal(ack.success, true);
    assert.equal(ack.status, 'ok');
    assert.equal(ack.messageId, ack.message.id);
    assert.equal(ack.message.content, 'hi');
    const pushed = await sb.next('message');
    assert.equal(pushed.id, ack.messageId);
    const old = await sb.next('new-message');
    assert.equal(old.id, ack.messageId);
    assert.equal(old.deliveryStatus, pushed.status);
    const mack = await sa.next('message:ack');
    assert.equal(mack.seq, ack.message.seq);
    // The same clientMsgId again: the stored message, no second push.
    const again = await sa.ack('message', { chatId: chat, content: 'hi', clientMsgId: `c-${name}` });
    assert.equal(again.messageId, ack.messageId);
    await sb.none('message');
    // The older name works the same.
    const legacy = await sb.ack('send-message', { chatId: chat, content: 'back' });
    assert.equal(legacy.success, true);
    assert.equal((await sa.message('back')).content, 'back');
    sa.close();
    sb.close();
  });
}

test('handshake: token with or without Bearer, in auth or the query; a bad one is refused', async () => {
  const u = await register(base);
  for (const opts of [
    { auth: { token: `Bearer ${u.token}` } },
    { auth: { token: u.token } },
    { query: { token: u.token } },
  ]) {
    const s = new Sio(base, { transports: ['websocket'], ...opts });
    await s.connected();
    assert.equal((await s.next('connection:established')).userId, u.id);
    s.close();
  }
  for (const opts of [{ auth: { token: 'Bearer nope' } }, { auth: {} }, { auth: { token: `${u.token}x` } }]) {
    const s = new Sio(base, { transports: ['polling'], ...opts });
    await assert.rejects(s.connected(), (e) => e.message === 'unauthorized');
    s.close();
  }
});

test('every chat event over Socket.IO, with acks', async () => {
  const [a, b, c] = [await register(base), await register(base), await register(base)];
  const sa = await sio(base, a.token);
  const sb = await sio(base, b.token, { transports: ['polling'] });
  const got = await sa.ack('chat:get', { recipientId: b.id });
  assert.equal(got.success, true);
  const chat = got.chat.id;
  const group = (await api(base, a.token, 'POST', '/api/chats', { participantIds: [b.id, c.id], title: 'g' })).body.chat.id;
  assert.equal((await sa.ack('chat:join', { chatId: chat })).chat.id, chat);
  assert.equal((await sb.ack('join-chat', { chatId: chat })).success, true, 'older name');
  assert.equal((await sa.ack('typing-start', { chatId: chat })).success, true);
  assert.deepEqual(await sb.next('user-typing'), { userId: a.id, chatId: chat });
  const sent = await sa.ack('message', { chatId: chat, content: 'one' });
  assert.deepEqual(await sb.next('user-stopped-typing'), { userId: a.id, chatId: chat });
  // Written to b's connection: delivered, in both shapes.
  const st = await sa.next('message:status');
  assert.equal(st.status, 'delivered');
  assert.deepEqual(await sa.next('message-delivered'), { messageId: sent.messageId, chatId: chat });
  const read = await sb.ack('message:read', { messageId: sent.messageId });
  assert.deepEqual([read.chatId, read.seq], [chat, 1]);
  assert.equal((await sa.next('message:status')).status, 'read');
  const pin = await sa.ack('message:pin', { messageId: sent.messageId });
  assert.equal(pin.message.pinned, true);
  assert.equal((await sb.next('message:pinned')).id, sent.messageId);
  assert.equal((await sa.ack('chat:get-pinned', { chatId: chat })).messages.length, 1);
  await sa.ack('message:unpin', { messageId: sent.messageId });
  assert.equal((await sb.next('message:unpinned')).pinned, false);
  const fwd = await sb.ack('message:forward', { messageId: sent.messageId, toChatId: group, additionalContent: 'look' });
  assert.equal(fwd.messages.length, 2);
  assert.equal(fwd.messages[1].forwardedFrom.messageId, sent.messageId);
  const multi = await sa.ack('message:forward-multiple', { messageIds: [sent.messageId], toChatId: group });
  assert.equal(multi.messages.length, 1);
  const sync = await sa.ack('sync', { cursors: {} });
  assert.ok(sync.chats.some((x) => x.chatId === chat && x.messages.length === 1));
  const users = await sa.ack('users:list', {});
  assert.ok(users.users.some((u) => u.id === b.id && u.isOnline === true));
  const pong = await sa.ack('ping', {});
  assert.ok(pong.serverTime);
  assert.ok((await sa.next('pong')).serverTime);
  const refreshed = await sa.ack('auth:refresh', { token: a.token });
  assert.ok(refreshed.expiresAt);
  assert.equal((await sb.ack('leave-chat', { chatId: chat })).success, true);
  await sa.ack('typing-start', { chatId: chat });
  await sb.none('user-typing');
  // Failures: the §7 shape, the code of §3.
  const denied = await sa.ack('chat:join', { chatId: 'no-such-chat' });
  assert.deepEqual(denied, { success: false, status: 'error', error: 'chat not found', code: 'not_found' });
  const bad = await sa.ack('message', { chatId: 7, content: 'x' });
  assert.equal(bad.code, 'bad_request');
  assert.match(bad.error, /chatId/);
  const unknown = await sa.ack('nope', {});
  assert.equal(unknown.error, 'unknown event `nope`');
  // Without an ack a failure is an `error` event, as on /ws.
  sa.emit('message', { content: 'no chat' });
  const err = await sa.next('error');
  assert.equal(err.code, 'bad_request');
  assert.equal(err.event, 'message');
  sa.close();
  sb.close();
});

test('presence in both shapes: users:update and user-online / user-offline', async () => {
  const [a, b] = [await register(base), await register(base)];
  await api(base, a.token, 'POST', '/api/chats', { participantIds: [b.id] });
  const sa = await sio(base, a.token);
  const sb = await sio(base, b.token, { transports: ['polling'] });
  assert.deepEqual(await sa.next('user-online'), { userId: b.id });
  assert.equal((await sa.next('users:update')).isOnline, true);
  sb.close();
  assert.deepEqual(await sa.next('user-offline'), { userId: b.id });
  const down = await sa.next('users:update');
  assert.equal(down.isOnline, false);
  assert.ok(down.lastSeenAt);
  sa.close();
});

test('a whole call over Socket.IO, and busy', async () => {
  const [a, b, c] = [await register(base), await register(base), await register(base)];
  const chat = (await api(base, a.token, 'POST', '/api/chats', { participantIds: [b.id] })).body.chat.id;
  const chatCb = (await api(base, c.token, 'POST', '/api/chats', { participantIds: [b.id] })).body.chat.id;
  const sa = await sio(base, a.token);
  const sb = await sio(base, b.token, { transports: ['polling'] });
  const sc = await sio(base, c.token);
  const offer = { type: 'offer', sdp: 'v=0 offer' };
  const init = await sa.ack('call:initiate', { chatId: chat, offer, callType: 'video' });
  assert.equal(init.success, true);
  const rang = await sb.next('call:offer');
  assert.deepEqual([rang.callId, rang.callerId, rang.callType, rang.offer], [init.callId, a.id, 'video', offer]);
  // b is ringing: c hears busy.
  const busy = await sc.ack('call:initiate', { chatId: chatCb, offer, callType: 'audio' });
  assert.deepEqual([busy.success, busy.code], [false, 'busy']);
  assert.deepEqual(await sc.next('call:busy'), { chatId: chatCb });
  const cand = { candidate: 'candidate:1 1 udp 1 127.0.0.1 9 typ host', sdpMid: '0', sdpMLineIndex: 0 };
  await sa.ack('call:ice-candidate', { chatId: chat, candidate: cand });
  assert.deepEqual((await sb.next('call:ice-candidate')).candidate, cand);
  const answer = { type: 'answer', sdp: 'v=0 answer' };
  assert.equal((await sb.ack('call:answer', { chatId: chat, answer })).callId, init.callId);
  assert.deepEqual((await sa.next('call:answer')).answer, answer);
  await sb.ack('call:ice-candidate', { chatId: chat, candidate: null });
  assert.equal((await sa.next('call:ice-candidate')).candidate, null);
  await sb.ack('call:end', { chatId: chat });
  assert.equal((await sa.next('call:end')).reason, 'ended');
  // The call shows in the chat history.
  const msg = await sa.next('message');
  assert.equal(msg.kind, 'call');
  // Errors are pushed as call:error, and the ack says so too.
  const none = await sa.ack('call:end', { chatId: chat });
  assert.deepEqual([none.success, none.code], [false, 'no_such_call']);
  assert.equal((await sa.next('call:error')).code, 'no_such_call');
  for (const s of [sa, sb, sc]) s.close();
});

test('a Socket.IO user and a /ws user talk both ways', async () => {
  const [a, b] = [await register(base), await register(base)];
  const chat = (await api(base, a.token, 'POST', '/api/chats', { participantIds: [b.id] })).body.chat.id;
  const sa = await sio(base, a.token, { transports: ['polling'] });
  const wb = await Ws.open(base, b.token);
  await sa.ack('message', { chatId: chat, content: 'from socket.io' });
  assert.equal((await wb.push('message')).content, 'from socket.io');
  const r = await wb.request('message', { chatId: chat, content: 'from /ws' });
  assert.equal(r.ok, true);
  assert.equal((await sa.message('from /ws')).content, 'from /ws');
  // The /ws user's reading shows at the Socket.IO sender.
  const mine = await sa.next('message:status');
  assert.equal(mine.status, 'delivered');
  sa.close();
  wb.socket.close();
});

test('4000 characters of Cyrillic and emoji over polling arrive intact', async () => {
  const [a, b] = [await register(base), await register(base)];
  const chat = (await api(base, a.token, 'POST', '/api/chats', { participantIds: [b.id] })).body.chat.id;
  const sa = await sio(base, a.token, { transports: ['polling'] });
  const sb = await sio(base, b.token, { transports: ['polling'] });
  const unit = 'Привет, мир! 👋🏽😀 ';
  const content = Array.from({ length: 4000 }, (_, i) => [...unit][i % [...unit].length]).join('');
  assert.equal([...content].length, 4000);
  const ack = await sa.ack('message', { chatId: chat, content });
  assert.equal(ack.message.content, content);
  assert.equal((await sb.message(content)).content, content);
  const { body } = await api(base, b.token, 'GET', `/api/chats/${chat}/messages`);
  assert.equal(body.messages[0].content, content);
  sa.close();
  sb.close();
});

test('the connection cap and the rate limits hold over polling too', async () => {
  const limited = await startServer({
    SWITCHBOARD_WS__MAX_CONNECTIONS_PER_USER: '2',
    SWITCHBOARD_WS__RATE_LIMIT: '5',
  });
  const u = await register(limited);
  const s1 = await sio(limited, u.token, { transports: ['polling'] });
  const s2 = await sio(limited, u.token, { transports: ['polling'] });
  const s3 = new Sio(limited, { auth: { token: u.token }, transports: ['polling'] });
  // The refusal and the disconnect may arrive in the same poll as the connect.
  const cut = new Promise((resolve) => s3.socket.once('disconnect', resolve));
  await s3.connected();
  const err = await s3.next('error');
  assert.equal(err.code, 'rate_limited');
  assert.match(err.message, /connections/);
  assert.equal(await cut, 'io server disconnect');
  // Rate: 5 events/s with a burst of 10; beyond it each event is refused with rate_limited...
  const acks = await Promise.all(Array.from({ length: 20 }, () => s1.ack('ping', {})));
  const refused = acks.filter((a) => a.code === 'rate_limited').length;
  assert.ok(refused >= 8, `refused ${refused} of 20`);
  assert.ok(acks.filter((a) => a.success).length >= 10);
  // ...and a client that keeps flooding is cut, as on /ws (4429 there).
  const gone = new Promise((resolve) => s2.socket.once('disconnect', resolve));
  for (let i = 0; i < 40; i++) s2.emit('ping', {});
  assert.equal(await gone, 'io server disconnect');
  s1.close();
});

test('an abandoned polling session is reaped, and an oversize polling body is refused', async () => {
  const base = await startServer({
    SWITCHBOARD_WS__MAX_CONNECTIONS_PER_USER: '1',
    SWITCHBOARD_WS__HEARTBEAT_INTERVAL: '500ms',
    SWITCHBOARD_WS__IDLE_TIMEOUT: '1s',
    SWITCHBOARD_WS__MAX_FRAME_BYTES: '2048',
  });
  const u = await register(base);
  // A raw Engine.IO polling session that connects the namespace, then never polls again.
  const url = `${base}/socket.io/?EIO=4&transport=polling`;
  const open = await (await fetch(url)).text();
  const { sid } = JSON.parse(open.slice(1));
  const post = (body) => fetch(`${url}&sid=${sid}`, { method: 'POST', body, headers: { 'content-type': 'text/plain' } });
  assert.equal((await post(`40${JSON.stringify({ token: u.token })}`)).status, 200);
  assert.match(await (await fetch(`${url}&sid=${sid}`)).text(), /(^|\x1e)40\{/);
  // While it lives, it holds the user's only connection.
  const refused = new Sio(base, { auth: { token: u.token }, transports: ['polling'] });
  await refused.connected();
  assert.match((await refused.next('error')).message, /connections/);
  // A body larger than ws.max_frame_bytes is refused (HTTP 413) before it is read whole.
  const big = await post(`42${JSON.stringify(['ping', { pad: 'x'.repeat(4096) }])}`);
  assert.equal(big.status, 413);
  // No pong within ws.idle_timeout: Engine.IO closes it and the session is gone with it, so the
  // user may connect again.
  await new Promise((r) => setTimeout(r, 2500));
  const again = await sio(base, u.token, { transports: ['polling'] });
  assert.deepEqual((await again.ack('ping', {})).success, true);
  await again.none('error', 300);
  again.close();
});

test('CORS: listed origins may call /api and poll with credentials, others get no CORS headers', async () => {
  const base = await startServer({ SWITCHBOARD_HTTP__CORS_ORIGINS: '["https://app.example"]' });
  const u = await register(base);
  const preflight = (origin, path) =>
    fetch(`${base}${path}`, {
      method: 'OPTIONS',
      headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type' },
    });
  for (const path of ['/api/chats', '/socket.io/?EIO=4&transport=polling']) {
    const ok = await preflight('https://app.example', path);
    assert.equal(ok.headers.get('access-control-allow-origin'), 'https://app.example', path);
    assert.equal(ok.headers.get('access-control-allow-credentials'), 'true', path);
    const other = await preflight('https://evil.example', path);
    assert.equal(other.headers.get('access-control-allow-origin'), null, path);
  }
  const r = await fetch(`${base}/api/chats`, { headers: { origin: 'https://app.example', authorization: `Bearer ${u.token}` } });
  assert.equal(r.status, 200);
  assert.equal(r.headers.get('access-control-allow-origin'), 'https://app.example');
  const poll = await fetch(`${base}/socket.io/?EIO=4&transport=polling`, { headers: { origin: 'https://app.example' } });
  assert.equal(poll.status, 200);
  assert.equal(poll.headers.get('access-control-allow-origin'), 'https://app.example');
  const foreign = await fetch(`${base}/socket.io/?EIO=4&transport=polling`, { headers: { origin: 'https://evil.example' } });
  assert.equal(foreign.headers.get('access-control-allow-origin'), null);
});
