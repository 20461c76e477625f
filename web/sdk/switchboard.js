// Switchboard browser SDK: one ES module, no build step.
//
// It gets the hard client parts right: reconnect with exponential backoff and jitter (capped at
// 15 s) on the close codes that mean "come back", never on 1000; a token refresh on 4401 (and
// never a loop on the same token); an application ping every 25 s; `sync` from stored cursors
// after every reconnect so no message is lost or duplicated; an outgoing queue while
// disconnected, flushed in order with each message's `clientMsgId`; request/reply with ids and
// timeouts; and a call helper around RTCPeerConnection.
//
// Wire contract: docs/protocol.md.

/** @typedef {'connecting'|'connected'|'reconnecting'|'disconnected'} Status */
/** @typedef {{id: string, chatId: string, seq: number, senderId: string, content: string,
 *   clientMsgId: string|null, createdAt: string, status: 'sent'|'delivered'|'read',
 *   pinned: boolean, forwardedFrom: null|{messageId: string, chatId: string, senderId: string},
 *   kind: 'text'|'call', call: null|object}} Message */

export const BACKOFF_BASE_MS = 500;
export const BACKOFF_MAX_MS = 15000;
export const PING_INTERVAL_MS = 25000;
export const REQUEST_TIMEOUT_MS = 10000;

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential, capped, with full jitter.
 * @param {number} attempt
 * @param {{baseMs?: number, maxMs?: number, random?: () => number}} [opts]
 */
export function backoffDelay(attempt, { baseMs = BACKOFF_BASE_MS, maxMs = BACKOFF_MAX_MS, random = Math.random } = {}) {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/**
 * What a close code asks the client to do (PROTOCOL §2 close codes).
 * @param {number} code
 * @returns {'reconnect'|'refresh'|'stop'}
 */
export function closeAction(code) {
  if (code === 1000 || code === 1009) return 'stop';
  if (code === 4401) return 'refresh';
  return 'reconnect'; // 1001, 1006, 1011, 1012, 4408, 4429, network errors
}

/** Per-chat last seen `seq`, persisted, so catch-up after reconnect has no gaps. */
export class Cursors {
  /** @param {{getItem(k:string):string|null, setItem(k:string,v:string):void}|null} [storage] */
  constructor(storage = null, key = 'switchboard.cursors') {
    this.storage = storage;
    this.key = key;
    /** @type {Record<string, number>} */
    this.map = {};
    try {
      this.map = JSON.parse(storage?.getItem(key) ?? '{}') || {};
    } catch {
      this.map = {};
    }
  }

  /** Whether `message` is new (and then remember it). Duplicates and old ones return false. */
  accept(message) {
    const last = this.map[message.chatId] ?? 0;
    if (message.seq <= last) return false;
    this.map[message.chatId] = message.seq;
    this.save();
    return true;
  }

  snapshot() {
    return { ...this.map };
  }

  save() {
    this.storage?.setItem(this.key, JSON.stringify(this.map));
  }
}

/** Messages typed while offline, sent in order once connected. */
export class OutgoingQueue {
  constructor() {
    /** @type {{chatId: string, content: string, clientMsgId: string, resolve: Function, reject: Function}[]} */
    this.items = [];
  }

  push(item) {
    this.items.push(item);
  }

  get length() {
    return this.items.length;
  }

  /**
   * Sends every queued item in order with `send` (which resolves with the stored message);
   * stops at the first failure and keeps it and the rest for the next flush. One flush runs at
   * a time: a call while one is running returns false at once (the running one sends the rest).
   * @param {(item) => Promise<Message>} send
   * @returns {Promise<boolean>} whether the queue is empty; `lastError` says why not.
   */
  async flush(send) {
    if (this.flushing) return false;
    this.flushing = true;
    this.lastError = null;
    try {
      while (this.items.length) {
        const item = this.items[0];
        let message;
        try {
          message = await send(item);
        } catch (e) {
          if (e && e.retryable === false) {
            this.items.shift();
            item.reject(e);
            continue;
          }
          this.lastError = e;
          return false;
        }
        this.items.shift();
        item.resolve(message);
      }
      return true;
    } finally {
      this.flushing = false;
    }
  }
}

/** A unique id for a message, so a retry after reconnect is not stored twice. */
export function newClientMsgId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export class RequestError extends Error {
  constructor(code, message, event) {
    super(message);
    this.code = code;
    this.event = event;
    // A request the server refused for what it is (not for the connection) is not retried.
    this.retryable = code === 'timeout' || code === 'disconnected' || code === 'rate_limited' || code === 'internal';
  }
}

/**
 * The client. Events (addEventListener / on): `status` {status}, `message` (Message),
 * `ack`, `status-change` (message:status), `typing` / `stopped-typing`, `presence`
 * (users:update), `pinned` / `unpinned`, `call:*` (every call push, as is), `error`,
 * `established` (connection:established data), `auth-failed`.
 */
export class Switchboard extends EventTarget {
  /**
   * @param {{url: string, getToken: () => Promise<string>|string,
   *   refreshToken?: () => Promise<string|null>, storage?: Storage|null,
   *   WebSocket?: typeof WebSocket, pingIntervalMs?: number, requestTimeoutMs?: number,
   *   backoff?: {baseMs?: number, maxMs?: number}}} opts
   */
  constructor(opts) {
    super();
    this.opts = opts;
    this.WS = opts.WebSocket ?? globalThis.WebSocket;
    /** @type {Status} */
    this.status = 'disconnected';
    this.cursors = new Cursors(opts.storage ?? null);
    this.queue = new OutgoingQueue();
    this.pending = new Map();
    this.nextId = 1;
    this.attempt = 0;
    this.ws = null;
    this.userId = null;
    this.iceServers = [];
    this.wanted = false;
    this.timers = { ping: null, reconnect: null, flush: null };
  }

  on(event, handler) {
    const wrapped = (e) => handler(e.detail);
    this.addEventListener(event, wrapped);
    return () => this.removeEventListener(event, wrapped);
  }

  emit(event, detail) {
    this.dispatchEvent(new CustomEvent(event, { detail }));
  }

  setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this.emit('status', { status });
  }

  /** Connects (and keeps reconnecting) until `close()`. */
  async connect() {
    this.wanted = true;
    await this.open(false);
  }

  /** Closes for good (1000): no reconnect. */
  close() {
    this.wanted = false;
    clearTimeout(this.timers.reconnect);
    clearTimeout(this.timers.flush);
    clearInterval(this.timers.ping);
    if (this.ws) this.ws.close(1000, 'bye');
    this.failPending('disconnected');
    this.setStatus('disconnected');
  }

  async open(reconnecting) {
    this.setStatus(reconnecting ? 'reconnecting' : 'connecting');
    let token;
    try {
      token = await this.opts.getToken();
    } catch {
      this.scheduleReconnect();
      return;
    }
    const sep = this.opts.url.includes('?') ? '&' : '?';
    const ws = new this.WS(`${this.opts.url}${sep}token=${encodeURIComponent(token)}`);
    this.ws = ws;
    this.token = token;
    ws.onmessage = (ev) => this.onFrame(ev.data);
    ws.onclose = (ev) => this.onClose(ws, ev.code);
    ws.onerror = () => {};
  }

  scheduleReconnect() {
    if (!this.wanted) return;
    this.setStatus('reconnecting');
    const delay = backoffDelay(this.attempt++, this.opts.backoff ?? {});
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = setTimeout(() => this.open(true), delay);
  }

  async onClose(ws, code) {
    if (ws !== this.ws) return;
    clearInterval(this.timers.ping);
    this.ws = null;
    this.failPending('disconnected');
    if (!this.wanted) return this.setStatus('disconnected');
    const action = closeAction(code);
    if (action === 'stop') {
      this.wanted = false;
      return this.setStatus('disconnected');
    }
    if (action === 'refresh') {
      // Never loop on the same token: reconnect only with a new one.
      const fresh = this.opts.refreshToken ? await this.opts.refreshToken().catch(() => null) : null;
      if (!fresh || fresh === this.token) {
        this.wanted = false;
        this.emit('auth-failed', { code });
        return this.setStatus('disconnected');
      }
    }
    this.scheduleReconnect();
  }

  failPending(code) {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new RequestError(code, `request failed: ${code}`, p.event));
    }
    this.pending.clear();
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== 1) throw new RequestError('disconnected', 'not connected');
    this.ws.send(JSON.stringify(frame));
  }

  /**
   * Sends `event` with an id and resolves with the reply's data (rejects with RequestError).
   * @returns {Promise<any>}
   */
  request(event, data = {}, { timeoutMs = this.opts.requestTimeoutMs ?? REQUEST_TIMEOUT_MS } = {}) {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      try {
        this.send({ event, data, id });
      } catch (e) {
        return reject(e);
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RequestError('timeout', `${event}: no reply within ${timeoutMs} ms`, event));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, event });
    });
  }

  async onEstablished(data) {
    this.userId = data.userId;
    this.iceServers = data.iceServers ?? [];
    this.attempt = 0;
    this.emit('established', data);
    clearInterval(this.timers.ping);
    this.timers.ping = setInterval(() => {
      try {
        this.send({ event: 'ping' });
      } catch {}
    }, this.opts.pingIntervalMs ?? PING_INTERVAL_MS);
    // Catch up from the cursors: exactly what was missed, in order.
    try {
      let more = true;
      while (more) {
        const reply = await this.request('sync', { cursors: this.cursors.snapshot() });
        more = false;
        for (const chat of reply.chats) {
          for (const m of chat.messages) this.deliver(m);
          if (chat.hasMore) more = true;
        }
      }
    } catch (e) {
      this.emit('error', e);
    }
    this.setStatus('connected');
    await this.flushQueue();
  }

  deliver(message) {
    if (this.cursors.accept(message)) this.emit('message', message);
  }

  onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    const { event, data } = frame;
    if (event === 'reply') {
      const p = this.pending.get(frame.id);
      if (!p) return;
      this.pending.delete(frame.id);
      clearTimeout(p.timer);
      if (frame.ok) p.resolve(frame.data);
      else p.reject(new RequestError(frame.error.code, frame.error.message, p.event));
      return;
    }
    switch (event) {
      case 'connection:established':
        return void this.onEstablished(data);
      case 'message':
        return this.deliver(data);
      case 'message:ack':
        return this.emit('ack', data);
      case 'message:status':
        return this.emit('status-change', data);
      case 'message:pinned':
        return this.emit('pinned', data);
      case 'message:unpinned':
        return this.emit('unpinned', data);
      case 'users:update':
        return this.emit('presence', data);
      case 'user-typing':
        return this.emit('typing', data);
      case 'user-stopped-typing':
        return this.emit('stopped-typing', data);
      case 'pong':
        return this.emit('pong', data);
      case 'error':
        return this.emit('error', data);
      default:
        if (event?.startsWith('call:')) this.emit(event, data);
    }
  }

  sendNow(item) {
    return this.request('message', { chatId: item.chatId, content: item.content, clientMsgId: item.clientMsgId }).then(
      (r) => {
        this.deliver(r.message);
        return r.message;
      },
    );
  }

  /**
   * Sends a message; while disconnected it waits in the queue and goes out, in order, after
   * the reconnect. Resolves with the stored message.
   * @returns {Promise<Message>}
   */
  sendMessage(chatId, content, clientMsgId = newClientMsgId()) {
    return new Promise((resolve, reject) => {
      this.queue.push({ chatId, content, clientMsgId, resolve, reject });
      this.flushQueue();
    });
  }

  /**
   * Sends what is queued while connected. When the server says `rate_limited` (or fails
   * internally), the rest is retried after a pause instead of waiting for the next reconnect.
   */
  async flushQueue() {
    if (this.status !== 'connected') return;
    const empty = await this.queue.flush((item) => this.sendNow(item)).catch(() => false);
    const e = this.queue.lastError;
    if (!empty && e && (e.code === 'rate_limited' || e.code === 'internal')) {
      clearTimeout(this.timers.flush);
      this.timers.flush = setTimeout(() => this.flushQueue(), this.opts.retryPauseMs ?? 1000);
    }
  }

  // Typed helpers for the chat events of PROTOCOL §2.1.
  getChat(recipientId) { return this.request('chat:get', { recipientId }).then((r) => r.chat); }
  joinChat(chatId, afterSeq) { return this.request('chat:join', afterSeq == null ? { chatId } : { chatId, afterSeq }); }
  leaveChat(chatId) { return this.request('chat:leave', { chatId }); }
  sync() { return this.request('sync', { cursors: this.cursors.snapshot() }); }
  listUsers() { return this.request('users:list').then((r) => r.users); }
  markRead(chatId, seq) { return this.request('message:read', { chatId, seq }); }
  markReadMessage(messageId) { return this.request('message:read', { messageId }); }
  pin(messageId) { return this.request('message:pin', { messageId }).then((r) => r.message); }
  unpin(messageId) { return this.request('message:unpin', { messageId }).then((r) => r.message); }
  getPinned(chatId) { return this.request('chat:get-pinned', { chatId }).then((r) => r.messages); }
  forward(messageId, toChatId, additionalContent) {
    const data = { messageId, toChatId };
    if (additionalContent) data.additionalContent = additionalContent;
    return this.request('message:forward', data).then((r) => r.messages);
  }
  forwardMultiple(messageIds, toChatId) { return this.request('message:forward-multiple', { messageIds, toChatId }).then((r) => r.messages); }
  typingStart(chatId) { try { this.send({ event: 'typing-start', data: { chatId } }); } catch {} }
  typingStop(chatId) { try { this.send({ event: 'typing-stop', data: { chatId } }); } catch {} }
  ping() { return this.request('ping'); }
}

/**
 * Why getUserMedia failed, in words a user understands.
 * @returns {{reason: 'no-device'|'permission-denied'|'in-use'|'insecure-context'|'unknown', message: string}}
 */
export function mediaError(err) {
  const name = err?.name ?? '';
  if (name === 'NotFoundError' || name === 'OverconstrainedError' || name === 'DevicesNotFoundError')
    return { reason: 'no-device', message: 'No camera or microphone was found.' };
  if (name === 'NotAllowedError' || name === 'PermissionDeniedError' || name === 'SecurityError')
    return { reason: 'permission-denied', message: 'Access to the camera or microphone was denied.' };
  if (name === 'NotReadableError' || name === 'TrackStartError' || name === 'AbortError')
    return { reason: 'in-use', message: 'The camera or microphone is in use by another application.' };
  if (name === 'TypeError') return { reason: 'insecure-context', message: 'Media needs https:// or localhost.' };
  return { reason: 'unknown', message: err?.message ?? 'Media error.' };
}

/**
 * 1:1 calls over a Switchboard connection. Events: `state` {state, reason?}, `incoming`
 * {chatId, callId, callerId, callType}, `remote-stream` (MediaStream), `local-stream`.
 * States: idle → calling | ringing → connecting → active → ended {reason}.
 * Reasons: ended, cancelled, rejected, busy, offline, no_answer, connection_lost,
 * answered_elsewhere, server_shutdown, media (+ mediaError), caller_busy, ...
 */
export class Calls extends EventTarget {
  /** @param {Switchboard} sb */
  constructor(sb, { RTCPeerConnection = globalThis.RTCPeerConnection, mediaDevices = globalThis.navigator?.mediaDevices, iceTransportPolicy = 'all' } = {}) {
    super();
    this.sb = sb;
    this.RTC = RTCPeerConnection;
    this.media = mediaDevices;
    this.iceTransportPolicy = iceTransportPolicy;
    this.reset();
    for (const ev of ['call:offer', 'call:answer', 'call:ice-candidate', 'call:end', 'call:rejected', 'call:no-answer', 'call:busy', 'call:error', 'call:peer-reconnecting', 'call:peer-resumed', 'call:renegotiate']) {
      sb.on(ev, (d) => this.onPush(ev, d));
    }
    // After a reconnect, tell the server this connection carries the call again.
    sb.on('established', () => {
      if (this.call && (this.state === 'active' || this.state === 'connecting' || this.state === 'calling')) {
        this.sb.request('call:resume', { chatId: this.call.chatId, callId: this.call.callId }).catch(() => {});
        this.restartIce();
      }
    });
  }

  reset() {
    this.state = 'idle';
    this.call = null;
    this.pc = null;
    this.local = null;
    this.pendingCandidates = [];
  }

  emit(event, detail) {
    this.dispatchEvent(new CustomEvent(event, { detail }));
  }

  on(event, handler) {
    const wrapped = (e) => handler(e.detail);
    this.addEventListener(event, wrapped);
    return () => this.removeEventListener(event, wrapped);
  }

  setState(state, extra = {}) {
    this.state = state;
    this.emit('state', { state, ...extra, call: this.call });
  }

  end(reason, extra = {}) {
    try { this.pc?.close(); } catch {}
    this.local?.getTracks().forEach((t) => t.stop());
    const call = this.call;
    this.reset();
    this.state = 'ended';
    this.emit('state', { state: 'ended', reason, call, ...extra });
  }

  async startMedia(callType) {
    try {
      this.local = await this.media.getUserMedia({ audio: true, video: callType === 'video' });
      this.emit('local-stream', this.local);
      return true;
    } catch (e) {
      this.end('media', mediaError(e));
      return false;
    }
  }

  makePeer() {
    const pc = new this.RTC({ iceServers: this.sb.iceServers, iceTransportPolicy: this.iceTransportPolicy });
    this.pc = pc;
    this.local?.getTracks().forEach((t) => pc.addTrack(t, this.local));
    pc.onicecandidate = (ev) => {
      if (ev.candidate && this.call) {
        this.sb.request('call:ice-candidate', { chatId: this.call.chatId, candidate: ev.candidate.toJSON() }).catch(() => {});
      }
    };
    pc.ontrack = (ev) => this.emit('remote-stream', ev.streams[0]);
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === 'connected' && this.state !== 'active') this.setState('active');
      if (pc.connectionState === 'failed' || pc.connectionState === 'disconnected') this.restartIce();
    };
    // Renegotiation (ICE restarts) goes through `call:renegotiate`; only the caller offers, so
    // the two sides never offer at once.
    pc.onnegotiationneeded = async () => {
      if (this.state !== 'active' || !this.call?.outgoing) return;
      try {
        const offer = await pc.createOffer();
        await pc.setLocalDescription(offer);
        await this.sb.request('call:renegotiate', { chatId: this.call.chatId, description: { type: offer.type, sdp: offer.sdp } });
      } catch {}
    };
    return pc;
  }

  /** After a network change: new candidates, same call. */
  restartIce() {
    if (this.call?.outgoing && this.state === 'active') {
      try { this.pc?.restartIce(); } catch {}
    }
  }

  /** Calls the other participant of a direct chat. */
  async start(chatId, callType = 'video') {
    if (this.call) throw new Error('already in a call');
    this.call = { chatId, callType, outgoing: true };
    this.setState('calling');
    if (!(await this.startMedia(callType))) return;
    const pc = this.makePeer();
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    try {
      const r = await this.sb.request('call:initiate', { chatId, callType, offer: { type: offer.type, sdp: offer.sdp } });
      if (this.call) this.call.callId = r.callId;
    } catch (e) {
      // busy / offline / caller_busy / ... also arrive as pushes; the reply decides here.
      if (this.call) this.end(e.code ?? 'error');
    }
  }

  async accept() {
    if (this.state !== 'ringing') return;
    const { chatId, callType, offer } = this.call;
    this.setState('connecting');
    if (!(await this.startMedia(callType))) {
      this.sb.request('call:reject', { chatId }).catch(() => {});
      return;
    }
    const pc = this.makePeer();
    await pc.setRemoteDescription(offer);
    for (const c of this.pendingCandidates.splice(0)) await pc.addIceCandidate(c).catch(() => {});
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    await this.sb.request('call:answer', { chatId, answer: { type: answer.type, sdp: answer.sdp } }).catch((e) => this.end(e.code));
  }

  reject() {
    if (this.state !== 'ringing') return;
    this.sb.request('call:reject', { chatId: this.call.chatId }).catch(() => {});
    this.end('rejected');
  }

  hangup() {
    if (!this.call) return;
    const cancelled = this.state === 'calling';
    this.sb.request('call:end', { chatId: this.call.chatId }).catch(() => {});
    this.end(cancelled ? 'cancelled' : 'ended');
  }

  async onPush(event, d) {
    const mine = this.call && d.chatId === this.call.chatId;
    switch (event) {
      case 'call:offer':
        if (this.call) return; // the server keeps us from ringing twice
        this.call = { chatId: d.chatId, callId: d.callId, callType: d.callType, callerId: d.callerId, offer: d.offer, outgoing: false };
        this.setState('ringing');
        return this.emit('incoming', d);
      case 'call:answer':
        if (!mine || !this.pc) return;
        this.setState('connecting');
        await this.pc.setRemoteDescription(d.answer);
        for (const c of this.pendingCandidates.splice(0)) await this.pc.addIceCandidate(c).catch(() => {});
        return;
      case 'call:ice-candidate':
        if (!mine || !d.candidate) return;
        if (this.pc?.remoteDescription) await this.pc.addIceCandidate(d.candidate).catch(() => {});
        else this.pendingCandidates.push(d.candidate);
        return;
      case 'call:end':
        if (mine) this.end(d.reason);
        return;
      case 'call:rejected':
        if (mine) this.end('rejected');
        return;
      case 'call:no-answer':
        if (mine) this.end('no_answer');
        return;
      case 'call:busy':
        if (mine) this.end('busy');
        return;
      case 'call:error':
        if (mine && this.state !== 'active') this.end(d.code, { message: d.message });
        return;
      case 'call:peer-reconnecting':
        if (mine) this.emit('peer', { reconnecting: true });
        return;
      case 'call:peer-resumed':
        if (mine) {
          this.emit('peer', { reconnecting: false });
          this.restartIce();
        }
        return;
      case 'call:renegotiate':
        if (!mine || !this.pc) return;
        await this.pc.setRemoteDescription(d.description);
        if (d.description.type === 'offer') {
          const answer = await this.pc.createAnswer();
          await this.pc.setLocalDescription(answer);
          await this.sb.request('call:renegotiate', { chatId: this.call.chatId, description: { type: answer.type, sdp: answer.sdp } }).catch(() => {});
        }
        return;
    }
  }
}
