// The demo messenger: plain JS on the SDK. Accounts, contacts with presence, chat with history,
// typing, sent/delivered/read ticks, pins, forwarding, audio/video calls.
import { Switchboard, Calls } from '/sdk/switchboard.js';

const $ = (id) => document.getElementById(id);
const state = {
  auth: JSON.parse(localStorage.getItem('sb.auth') || 'null'),
  users: new Map(),
  chats: new Map(), // peerId -> chat
  messages: new Map(), // chatId -> Map(seq -> message)
  unread: new Map(),
  current: null, // {chat, peer}
  sb: null,
  calls: null,
  typingTimer: null,
};

// ------------------------------------------------------------------ auth

async function api(path, { method = 'GET', body, token } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error?.message || `HTTP ${res.status}`);
  return data;
}

function saveAuth(a) {
  state.auth = a;
  if (a) localStorage.setItem('sb.auth', JSON.stringify(a));
  else localStorage.removeItem('sb.auth');
}

async function refreshToken() {
  try {
    const a = await api('/api/auth/refresh', { method: 'POST', body: { refreshToken: state.auth.refreshToken } });
    saveAuth({ ...a });
    return a.accessToken;
  } catch {
    return null;
  }
}

$('auth-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const action = ev.submitter?.dataset.action || 'login';
  const body = { username: $('username').value.trim().toLowerCase(), password: $('password').value };
  if (action === 'register' && $('display-name').value.trim()) body.displayName = $('display-name').value.trim();
  try {
    saveAuth(await api(`/api/auth/${action}`, { method: 'POST', body }));
    start();
  } catch (e) {
    $('auth-error').textContent = e.message;
  }
});

$('logout').addEventListener('click', () => {
  state.sb?.close();
  saveAuth(null);
  localStorage.removeItem('switchboard.cursors');
  location.reload();
});

// ------------------------------------------------------------------ main

function initials(u) {
  return (u?.displayName || u?.username || '?').slice(0, 1).toUpperCase();
}

function renderContacts() {
  const me = state.auth.user.id;
  const list = $('contacts');
  list.innerHTML = '';
  for (const u of state.users.values()) {
    if (u.id === me) continue;
    const li = document.createElement('li');
    li.dataset.user = u.username;
    if (state.current?.peer.id === u.id) li.classList.add('active');
    const chat = state.chats.get(u.id);
    const unread = chat ? state.unread.get(chat.id) || 0 : 0;
    li.innerHTML = `<div class="avatar">${initials(u)}<span class="dot ${u.isOnline ? 'online' : ''}"></span></div>
      <div><div>${escapeHtml(u.displayName)}</div><div class="muted small">${u.isOnline ? 'online' : lastSeen(u)}</div></div>
      ${unread ? `<span class="badge">${unread}</span>` : ''}`;
    li.addEventListener('click', () => openChat(u));
    list.appendChild(li);
  }
}

function lastSeen(u) {
  return u.lastSeenAt ? `last seen ${new Date(u.lastSeenAt).toLocaleString()}` : 'offline';
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

/** Presence is shown to contacts only: the list changes when a chat makes someone a contact. */
async function refreshUsers() {
  const users = await state.sb.listUsers();
  state.users = new Map(users.map((u) => [u.id, u]));
  renderContacts();
  renderPeerStatus();
}

async function openChat(peer) {
  const sb = state.sb;
  if (state.current) sb.leaveChat(state.current.chat.id).catch(() => {});
  const chat = await sb.getChat(peer.id);
  const isNew = !state.chats.has(peer.id);
  state.chats.set(peer.id, chat);
  if (isNew) refreshUsers().catch(() => {});
  state.current = { chat, peer };
  const joined = await sb.joinChat(chat.id);
  const map = state.messages.get(chat.id) || new Map();
  for (const m of joined.messages) map.set(m.seq, m);
  state.messages.set(chat.id, map);
  $('chat-empty').classList.add('hidden');
  $('chat-inner').classList.remove('hidden');
  $('peer-name').textContent = peer.displayName;
  renderPeerStatus();
  renderPinned(joined.pinned);
  renderMessages();
  markRead();
  renderContacts();
  $('text').focus();
}

function renderPeerStatus() {
  const peer = state.current && state.users.get(state.current.peer.id);
  if (peer) $('peer-status').textContent = peer.isOnline ? 'online' : lastSeen(peer);
}

function renderPinned(pinned) {
  const box = $('pinned');
  if (!pinned?.length) return box.classList.add('hidden');
  box.classList.remove('hidden');
  box.textContent = `Pinned: ${pinned[pinned.length - 1].content}`;
}

function tick(m) {
  if (m.senderId !== state.auth.user.id || m.kind === 'call') return '';
  if (m.status === 'read') return '<span class="tick read" data-status="read">✓✓</span>';
  if (m.status === 'delivered') return '<span class="tick" data-status="delivered">✓✓</span>';
  return '<span class="tick" data-status="sent">✓</span>';
}

function renderMessages() {
  if (!state.current) return;
  const list = $('messages');
  const msgs = [...(state.messages.get(state.current.chat.id)?.values() || [])].sort((a, b) => a.seq - b.seq);
  list.innerHTML = '';
  for (const m of msgs) {
    const li = document.createElement('li');
    li.className = `msg ${m.senderId === state.auth.user.id ? 'mine' : ''} ${m.kind === 'call' ? 'call' : ''}`;
    li.dataset.seq = m.seq;
    const fwd = m.forwardedFrom ? `<div class="fwd">Forwarded from ${escapeHtml(state.users.get(m.forwardedFrom.senderId)?.displayName || 'someone')}</div>` : '';
    li.innerHTML = `${fwd}<div class="content">${escapeHtml(m.content)}</div>
      <div class="meta"><span class="actions"><button data-pin>${m.pinned ? 'unpin' : 'pin'}</button><button data-fwd>forward</button></span>
      ${m.pinned ? '<span class="pin">pinned</span>' : ''}<span>${new Date(m.createdAt).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })}</span>${tick(m)}</div>`;
    li.querySelector('[data-pin]').addEventListener('click', () => (m.pinned ? state.sb.unpin(m.id) : state.sb.pin(m.id)).catch(showError));
    li.querySelector('[data-fwd]').addEventListener('click', () => forward(m));
    list.appendChild(li);
  }
  list.scrollTop = list.scrollHeight;
}

function upsert(m) {
  const map = state.messages.get(m.chatId) || new Map();
  const old = map.get(m.seq);
  // Statuses only move forward.
  const rank = { sent: 0, delivered: 1, read: 2 };
  if (old && rank[old.status] > rank[m.status]) m = { ...m, status: old.status };
  map.set(m.seq, m);
  state.messages.set(m.chatId, map);
}

function markRead() {
  if (!state.current || document.hidden) return;
  const msgs = [...(state.messages.get(state.current.chat.id)?.values() || [])];
  const top = Math.max(0, ...msgs.filter((m) => m.senderId !== state.auth.user.id).map((m) => m.seq));
  if (top > (state.current.readSeq || 0)) {
    state.current.readSeq = top;
    state.sb.markRead(state.current.chat.id, top).catch(() => {});
  }
  state.unread.set(state.current.chat.id, 0);
}

function forward(m) {
  const list = $('forward-list');
  list.innerHTML = '';
  for (const u of state.users.values()) {
    if (u.id === state.auth.user.id) continue;
    const li = document.createElement('li');
    li.textContent = u.displayName;
    li.addEventListener('click', async () => {
      $('forward-dialog').close();
      const chat = await state.sb.getChat(u.id);
      await state.sb.forward(m.id, chat.id).catch(showError);
    });
    list.appendChild(li);
  }
  $('forward-dialog').showModal();
}

function showDialog(text) {
  $('dialog-text').textContent = text;
  if (!$('dialog').open) $('dialog').showModal();
}

function showError(e) {
  showDialog(e.message || String(e));
}

$('composer').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = $('text').value.trim();
  if (!text || !state.current) return;
  $('text').value = '';
  const chatId = state.current.chat.id;
  state.sb.sendMessage(chatId, text).then((m) => {
    upsert(m);
    if (state.current?.chat.id === chatId) renderMessages();
  }, showError);
  state.sb.typingStop(chatId);
});

$('text').addEventListener('input', () => {
  if (!state.current) return;
  const now = Date.now();
  if (!state.lastTyping || now - state.lastTyping > 3000) {
    state.lastTyping = now;
    state.sb.typingStart(state.current.chat.id);
  }
});

document.addEventListener('visibilitychange', markRead);

// ------------------------------------------------------------------ calls

const REASONS = {
  busy: 'The user is busy on another call.',
  offline: 'The user is offline.',
  no_answer: 'No answer.',
  connection_lost: 'The connection was lost.',
  rejected: 'The call was declined.',
  caller_busy: 'You are already in a call.',
  server_shutdown: 'The server is shutting down.',
  unsupported: 'Calls work in direct chats only.',
};

function callUi(st) {
  const call = $('call');
  const { state: s, reason, message } = st;
  const peerId = state.calls.call?.callerId || state.current?.peer.id;
  const peer = state.users.get(peerId);
  $('call-title').textContent = peer?.displayName || '';
  $('accept').classList.toggle('hidden', s !== 'ringing');
  $('reject').classList.toggle('hidden', s !== 'ringing');
  $('hangup').classList.toggle('hidden', !['calling', 'connecting', 'active'].includes(s));
  call.classList.toggle('hidden', s === 'ended' || s === 'idle');
  call.dataset.state = s;
  $('call-state').textContent = { calling: 'Calling…', ringing: 'Incoming call', connecting: 'Connecting…', active: 'In call' }[s] || '';
  if (s === 'ended') {
    $('remote-video').srcObject = null;
    $('local-video').srcObject = null;
    const text = reason === 'media' ? message : REASONS[reason];
    if (text) showDialog(text);
  }
}

$('audio-call').addEventListener('click', () => state.current && state.calls.start(state.current.chat.id, 'audio'));
$('video-call').addEventListener('click', () => state.current && state.calls.start(state.current.chat.id, 'video'));
$('accept').addEventListener('click', () => state.calls.accept());
$('reject').addEventListener('click', () => state.calls.reject());
$('hangup').addEventListener('click', () => state.calls.hangup());

// ------------------------------------------------------------------ start

async function start() {
  $('auth').classList.add('hidden');
  $('main').classList.remove('hidden');
  $('me-name').textContent = state.auth.user.displayName;
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  const sb = new Switchboard({
    url: `${proto}://${location.host}/ws`,
    getToken: () => state.auth.accessToken,
    refreshToken,
    storage: localStorage,
  });
  state.sb = sb;
  // Tests can force TURN-only media with ?relay=1.
  const relay = new URLSearchParams(location.search).get('relay') === '1';
  state.calls = new Calls(sb, { iceTransportPolicy: relay ? 'relay' : 'all' });
  window.switchboard = { sb, calls: state.calls };
  state.calls.on('state', callUi);
  state.calls.on('incoming', () => callUi({ state: 'ringing' }));
  state.calls.on('local-stream', (s) => ($('local-video').srcObject = s));
  state.calls.on('remote-stream', (s) => ($('remote-video').srcObject = s));

  sb.on('status', ({ status }) => {
    $('conn-status').textContent = status;
    $('banner').classList.toggle('hidden', status === 'connected');
  });
  sb.on('auth-failed', () => {
    saveAuth(null);
    location.reload();
  });
  sb.on('established', () => refreshUsers());
  sb.on('message', (m) => {
    upsert(m);
    if (state.current?.chat.id === m.chatId) {
      renderMessages();
      markRead();
    } else if (m.senderId !== state.auth.user.id) {
      state.unread.set(m.chatId, (state.unread.get(m.chatId) || 0) + 1);
      const peer = [...state.chats.entries()].find(([, c]) => c.id === m.chatId);
      if (!peer) refreshUsers().catch(() => {});
      renderContacts();
    }
  });
  sb.on('status-change', (s) => {
    const map = state.messages.get(s.chatId);
    if (!map) return;
    // Cumulative: every own message up to this seq has at least this status.
    for (const m of map.values()) {
      if (m.senderId === state.auth.user.id && m.seq <= s.seq) upsert({ ...m, status: s.status });
    }
    if (state.current?.chat.id === s.chatId) renderMessages();
  });
  const pinChange = (m) => {
    upsert(m);
    if (state.current?.chat.id === m.chatId) {
      renderMessages();
      sb.getPinned(m.chatId).then(renderPinned, () => {});
    }
  };
  sb.on('pinned', pinChange);
  sb.on('unpinned', pinChange);
  sb.on('presence', (p) => {
    const u = state.users.get(p.userId);
    if (u) Object.assign(u, { isOnline: p.isOnline, lastSeenAt: p.lastSeenAt });
    renderContacts();
    renderPeerStatus();
  });
  sb.on('typing', (t) => {
    if (state.current?.chat.id === t.chatId) $('typing').classList.remove('hidden');
  });
  sb.on('stopped-typing', (t) => {
    if (state.current?.chat.id === t.chatId) $('typing').classList.add('hidden');
  });
  await sb.connect();
}

if (state.auth) start();
