// Helpers of the Socket.IO tests: the real server binary on a fresh port, REST calls, a
// socket.io-client socket that keeps what it received, and a plain /ws client.
import { after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { io } from 'socket.io-client';
import WebSocket from 'ws';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');
const BIN = process.env.SWITCHBOARD_BIN || join(root, 'target', 'debug', 'switchboard');
assert.ok(existsSync(BIN), `${BIN} is missing: cargo build first (scripts/test.sh does)`);

export const WAIT = 8000;
const servers = [];
const sockets = [];

after(async () => {
  for (const s of sockets) s.close?.() ?? s.disconnect?.();
  for (const s of servers) s.kill('SIGTERM');
});

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** The real binary on a fresh port with `env`; its base URL once ready. */
export async function startServer(env = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'sb-sio-'));
  const port = await freePort();
  const server = spawn(BIN, [], {
    env: {
      ...process.env,
      SWITCHBOARD_DATA_DIR: join(dir, 'data'),
      SWITCHBOARD_HTTP__LISTEN: `127.0.0.1:${port}`,
      SWITCHBOARD_TURN__ENABLED: 'false',
      SWITCHBOARD_AUTH__REGISTER_MAX_PER_IP: '0',
      SWITCHBOARD_WS__USER_MESSAGE_RATE: '0',
      SWITCHBOARD_PRESENCE__OFFLINE_GRACE: '200ms',
      ...env,
    },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  servers.push(server);
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 300; i++) {
    try {
      if ((await fetch(`${base}/readyz`)).ok) return base;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('server did not become ready');
}

let seq = 0;
export async function register(base, prefix = 'u') {
  const username = `${prefix}${Date.now() % 100000}${seq++}`;
  const r = await fetch(`${base}/api/auth/register`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username, password: 'password123' }),
  });
  assert.equal(r.status, 201);
  const body = await r.json();
  return { id: body.user.id, token: body.accessToken, username };
}

export async function api(base, token, method, path, body) {
  const r = await fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: r.status, body: await r.json().catch(() => null) };
}

/** A socket.io-client socket that keeps every event it got, for `next` to find. */
export class Sio {
  constructor(base, opts) {
    this.events = [];
    this.waiters = [];
    this.socket = io(base, { forceNew: true, reconnection: false, ...opts });
    sockets.push(this.socket);
    this.socket.onAny((event, data) => {
      this.events.push({ event, data });
      this.waiters = this.waiters.filter((w) => !w());
    });
  }

  connected() {
    return new Promise((resolve, reject) => {
      if (this.socket.connected) return resolve(this);
      this.socket.once('connect', () => resolve(this));
      this.socket.once('connect_error', reject);
    });
  }

  /** The next `event` whose data passes `pred` (taken from what arrived already first). */
  next(event, within = WAIT, pred = () => true) {
    return new Promise((resolve, reject) => {
      const take = () => {
        const i = this.events.findIndex((e) => e.event === event && pred(e.data));
        if (i < 0) return false;
        resolve(this.events.splice(i, 1)[0].data);
        return true;
      };
      if (take()) return;
      const timer = setTimeout(() => reject(new Error(`no ${event} within ${within} ms; got ${JSON.stringify(this.events.map((e) => e.event))}`)), within);
      this.waiters.push(() => {
        if (take()) {
          clearTimeout(timer);
          return true;
        }
        return false;
      });
    });
  }

  /** The next `message` push with this content. */
  message(content) {
    return this.next('message', WAIT, (m) => m.content === content);
  }

  /** Nothing named `event` arrives within `ms`. */
  async none(event, ms = 400) {
    await new Promise((r) => setTimeout(r, ms));
    assert.ok(!this.events.some((e) => e.event === event), `unexpected ${event}`);
  }

  ack(event, data) {
    return this.socket.timeout(WAIT).emitWithAck(event, data);
  }

  emit(event, data) {
    this.socket.emit(event, data);
  }

  close() {
    this.socket.disconnect();
  }
}

export async function sio(base, token, opts = {}) {
  const s = new Sio(base, { auth: { token: `Bearer ${token}` }, ...opts });
  await s.connected();
  return s;
}

/** A plain /ws client: requests with ids, pushes kept for `next`. */
export class Ws {
  static async open(base, token) {
    const w = new Ws();
    w.socket = new WebSocket(`${base.replace('http', 'ws')}/ws?token=${token}`);
    sockets.push(w.socket);
    w.frames = [];
    w.waiters = [];
    w.id = 1;
    w.socket.on('message', (m) => {
      w.frames.push(JSON.parse(m.toString()));
      w.waiters = w.waiters.filter((f) => !f());
    });
    await w.next((f) => f.event === 'connection:established');
    return w;
  }

  next(pred, within = WAIT) {
    return new Promise((resolve, reject) => {
      const take = () => {
        const i = this.frames.findIndex(pred);
        if (i < 0) return false;
        resolve(this.frames.splice(i, 1)[0]);
        return true;
      };
      if (take()) return;
      const timer = setTimeout(() => reject(new Error('no such frame')), within);
      this.waiters.push(() => (take() ? (clearTimeout(timer), true) : false));
    });
  }

  async push(event) {
    return (await this.next((f) => f.event === event)).data;
  }

  async request(event, data) {
    const id = this.id++;
    this.socket.send(JSON.stringify({ event, data, id }));
    return this.next((f) => f.event === 'reply' && f.id === id);
  }
}

