// Reference Socket.IO 4 server for the WebSocket benchmark: the seeds' stack (Node + Socket.IO,
// rooms + broadcast) without a database, so the comparison flatters it if anything.
// Events mirror Switchboard's: join a room, message -> broadcast to the room + ack, ping,
// call:initiate -> call:offer to the other room member. Both transports (WebSocket and
// long-polling), as the seeds' server served them.
import { createServer } from 'node:http';
import { Server } from 'socket.io';

const port = Number(process.env.PORT || 0);
const http = createServer();
const io = new Server(http, { transports: ['polling', 'websocket'], perMessageDeflate: false, maxHttpBufferSize: 65536 });
let seq = 0;

io.on('connection', (socket) => {
  socket.on('join', (room, ack) => {
    socket.join(room);
    ack?.({ ok: true });
  });
  socket.on('message', (msg, ack) => {
    const stored = { id: String(++seq), chatId: msg.chatId, content: msg.content, senderId: socket.id, seq };
    io.to(msg.chatId).emit('message', stored);
    ack?.({ message: stored });
  });
  socket.on('call:initiate', (msg, ack) => {
    socket.to(msg.chatId).emit('call:offer', { chatId: msg.chatId, callId: String(++seq), offer: msg.offer });
    ack?.({ callId: String(seq) });
  });
});

http.listen(port, '127.0.0.1', () => {
  console.log(`socketio listening port=${http.address().port}`);
});
