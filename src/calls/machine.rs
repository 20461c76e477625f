//! The call signaling state machine (PROTOCOL §2.2), pure: no tokio, no sockets, no clock.
//!
//! Inputs are a user's signals (from one of their connections), connection up/down events and
//! `now` (unix ms). Outputs are [`Command`]s, drained with [`Machine::poll_command`] after every
//! input; [`Machine::poll_timeout`] says when [`Machine::handle_timeout`] is due next. A signal's
//! own success or failure is its return value (the shell turns failures into `call:error` /
//! `call:busy` pushes and failed replies).
//!
//! Access checks that need the store (the chat exists, the caller is in it, it is direct) are
//! made by the shell before [`Machine::initiate`]; everything about who is engaged, online or
//! ringing lives here.

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde_json::{json, Value};

pub use crate::hub::ConnId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallType {
    Audio,
    Video,
}

impl CallType {
    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Audio => "audio",
            CallType::Video => "video",
        }
    }
}

/// Why a call ended (the `reason` of `call:end`, and what is recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Hung up after it was answered.
    Ended,
    /// The caller hung up while it was ringing.
    Cancelled,
    Rejected,
    NoAnswer,
    ConnectionLost,
    /// Every ringing device went away and none came back within the grace.
    Offline,
    ServerShutdown,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Ended => "ended",
            EndReason::Cancelled => "cancelled",
            EndReason::Rejected => "rejected",
            EndReason::NoAnswer => "no_answer",
            EndReason::ConnectionLost => "connection_lost",
            EndReason::Offline => "offline",
            EndReason::ServerShutdown => "server_shutdown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallErrorCode {
    CallerBusy,
    Offline,
    /// The callee is engaged: answered with `call:busy`, not `call:error`.
    Busy,
    NoSuchCall,
}

impl CallErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            CallErrorCode::CallerBusy => "caller_busy",
            CallErrorCode::Offline => "offline",
            CallErrorCode::Busy => "busy",
            CallErrorCode::NoSuchCall => "no_such_call",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            CallErrorCode::CallerBusy => "you are already in a call",
            CallErrorCode::Offline => "the user is offline",
            CallErrorCode::Busy => "the user is busy",
            CallErrorCode::NoSuchCall => "no such call",
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Push `event` with `data` to one connection of `user`.
    Send {
        user: String,
        conn: ConnId,
        event: &'static str,
        data: Value,
    },
    /// A call is over: record it (and show it in the chat).
    Ended(CallSummary),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSummary {
    pub call_id: String,
    pub chat_id: String,
    pub caller_id: String,
    pub callee_id: String,
    pub call_type: CallType,
    pub started_at: i64,
    pub answered_at: Option<i64>,
    pub ended_at: i64,
    pub reason: EndReason,
}

/// A `call:initiate` that passed the store checks.
#[derive(Debug, Clone)]
pub struct Initiate {
    /// Chosen by the shell (randomness is a parameter too).
    pub call_id: String,
    pub chat_id: String,
    pub callee_id: String,
    pub call_type: CallType,
    pub offer: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Callee connections currently ringing.
    Ringing {
        devices: BTreeSet<ConnId>,
    },
    Active {
        answered_at: i64,
    },
}

/// One side of a call: its connection, or when it went away.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Party {
    user: String,
    /// `None` while the party's connection is gone (inside the reconnect grace).
    conn: Option<ConnId>,
    /// When the grace runs out.
    away_until: Option<i64>,
}

#[derive(Debug, Clone)]
struct Call {
    id: String,
    chat_id: String,
    call_type: CallType,
    offer: Value,
    started_at: i64,
    ring_deadline: i64,
    caller: Party,
    /// `conn` is set once answered.
    callee: Party,
    phase: Phase,
    /// Ringing with no device left: the caller hears `offline` at this time.
    no_devices_until: Option<i64>,
}

impl Call {
    /// The caller's connection, while it is there.
    fn caller_targets(&self) -> Vec<(String, ConnId)> {
        let user = &self.caller.user;
        self.caller
            .conn
            .map(|c| (user.clone(), c))
            .into_iter()
            .collect()
    }

    /// The callee's connections in the call: every ringing device, then the answering one.
    fn callee_targets(&self) -> Vec<(String, ConnId)> {
        let user = &self.callee.user;
        match &self.phase {
            Phase::Ringing { devices } => devices.iter().map(|d| (user.clone(), *d)).collect(),
            Phase::Active { .. } => self
                .callee
                .conn
                .map(|c| (user.clone(), c))
                .into_iter()
                .collect(),
        }
    }
}

pub struct Machine {
    ring_timeout_ms: i64,
    grace_ms: i64,
    /// Live connections per user.
    online: HashMap<String, BTreeSet<ConnId>>,
    calls: HashMap<String, Call>,
    /// Engaged users → their call.
    by_user: HashMap<String, String>,
    commands: VecDeque<Command>,
}

type Result<T> = std::result::Result<T, CallErrorCode>;

impl Machine {
    pub fn new(ring_timeout_ms: i64, grace_ms: i64) -> Self {
        Self {
            ring_timeout_ms,
            grace_ms,
            online: HashMap::new(),
            calls: HashMap::new(),
            by_user: HashMap::new(),
            commands: VecDeque::new(),
        }
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Whether `user` is ringing or in a call.
    pub fn is_engaged(&self, user: &str) -> bool {
        self.by_user.contains_key(user)
    }

    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    fn send(&mut self, user: &str, conn: ConnId, event: &'static str, data: Value) {
        self.commands.push_back(Command::Send {
            user: user.to_owned(),
            conn,
            event,
            data,
        });
    }

    fn send_each(&mut self, targets: Vec<(String, ConnId)>, event: &'static str, data: &Value) {
        for (user, conn) in targets {
            self.send(&user, conn, event, data.clone());
        }
    }

    fn ids(call: &Call) -> Value {
        json!({"chatId": call.chat_id, "callId": call.id})
    }

    fn end_data(call: &Call, reason: &str) -> Value {
        json!({"chatId": call.chat_id, "callId": call.id, "reason": reason})
    }

    fn offer_data(call: &Call) -> Value {
        json!({
            "chatId": call.chat_id,
            "callId": call.id,
            "callerId": call.caller.user,
            "callType": call.call_type.as_str(),
            "offer": call.offer,
        })
    }

    /// Removes the call and emits its record.
    fn finish(&mut self, call_id: &str, reason: EndReason, now: i64) {
        let Some(call) = self.calls.remove(call_id) else {
            return;
        };
        for user in [&call.caller.user, &call.callee.user] {
            if self.by_user.get(user) == Some(&call.id) {
                self.by_user.remove(user);
            }
        }
        let answered_at = match call.phase {
            Phase::Active { answered_at } => Some(answered_at),
            Phase::Ringing { .. } => None,
        };
        self.commands.push_back(Command::Ended(CallSummary {
            call_id: call.id,
            chat_id: call.chat_id,
            caller_id: call.caller.user,
            callee_id: call.callee.user,
            call_type: call.call_type,
            started_at: call.started_at,
            answered_at,
            ended_at: now,
            reason,
        }));
    }

    /// The user's current call, if it is in `chat_id`.
    fn call_of(&self, user: &str, chat_id: &str) -> Result<String> {
        let id = self.by_user.get(user).ok_or(CallErrorCode::NoSuchCall)?;
        let call = self.calls.get(id).ok_or(CallErrorCode::NoSuchCall)?;
        if call.chat_id == chat_id {
            Ok(id.clone())
        } else {
            Err(CallErrorCode::NoSuchCall)
        }
    }

    // ---------------------------------------------------------------- connections

    pub fn connection_up(&mut self, user: &str, conn: ConnId, now: i64) {
        let _ = now;
        self.online.entry(user.to_owned()).or_default().insert(conn);
        // A callee who (re)connects while being called rings on the new device too, so a page
        // reload during ringing does not lose the call.
        let Some(id) = self.by_user.get(user).cloned() else {
            return;
        };
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.callee.user != user {
            return;
        }
        if let Phase::Ringing { devices } = &mut call.phase {
            devices.insert(conn);
            call.no_devices_until = None;
            let data = Self::offer_data(call);
            self.send(user, conn, "call:offer", data);
        }
    }

    pub fn connection_down(&mut self, user: &str, conn: ConnId, now: i64) {
        if let Some(set) = self.online.get_mut(user) {
            set.remove(&conn);
            if set.is_empty() {
                self.online.remove(user);
            }
        }
        let Some(id) = self.by_user.get(user).cloned() else {
            return;
        };
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let grace = self.grace_ms;
        if call.caller.user == user && call.caller.conn == Some(conn) {
            call.caller.conn = None;
            call.caller.away_until = Some(now + grace);
            let (others, data) = (call.callee_targets(), Self::ids(call));
            self.send_each(others, "call:peer-reconnecting", &data);
        } else if call.callee.user == user {
            match &mut call.phase {
                Phase::Ringing { devices } => {
                    // A ringing device that drops just stops ringing.
                    devices.remove(&conn);
                    if devices.is_empty() {
                        call.no_devices_until = Some(now + grace);
                    }
                }
                Phase::Active { .. } if call.callee.conn == Some(conn) => {
                    call.callee.conn = None;
                    call.callee.away_until = Some(now + grace);
                    let (caller, data) = (call.caller.user.clone(), Self::ids(call));
                    if let Some(c) = call.caller.conn {
                        self.send(&caller, c, "call:peer-reconnecting", data);
                    }
                }
                Phase::Active { .. } => {}
            }
        } else {
            return;
        }
        if grace <= 0 {
            self.handle_timeout(now);
        }
    }

    // ---------------------------------------------------------------- signals

    pub fn initiate(
        &mut self,
        caller: &str,
        conn: ConnId,
        req: Initiate,
        now: i64,
    ) -> Result<String> {
        if let Some(current) = self.by_user.get(caller).and_then(|id| self.calls.get(id)) {
            // Glare: both call each other at once. The call that reached the server first
            // survives; the second caller is already ringing with it, so they hear `busy`.
            let glare = current.callee.user == caller
                && current.caller.user == req.callee_id
                && current.chat_id == req.chat_id;
            return Err(if glare {
                CallErrorCode::Busy
            } else {
                CallErrorCode::CallerBusy
            });
        }
        let devices: BTreeSet<ConnId> = match self.online.get(&req.callee_id) {
            Some(set) if !set.is_empty() => set.clone(),
            _ => return Err(CallErrorCode::Offline),
        };
        if self.by_user.contains_key(&req.callee_id) {
            return Err(CallErrorCode::Busy);
        }
        let call = Call {
            id: req.call_id.clone(),
            chat_id: req.chat_id,
            call_type: req.call_type,
            offer: req.offer,
            started_at: now,
            ring_deadline: now + self.ring_timeout_ms,
            caller: Party {
                user: caller.to_owned(),
                conn: Some(conn),
                away_until: None,
            },
            callee: Party {
                user: req.callee_id.clone(),
                conn: None,
                away_until: None,
            },
            phase: Phase::Ringing {
                devices: devices.clone(),
            },
            no_devices_until: None,
        };
        let data = Self::offer_data(&call);
        for d in devices {
            self.send(&req.callee_id, d, "call:offer", data.clone());
        }
        self.by_user.insert(caller.to_owned(), call.id.clone());
        self.by_user.insert(req.callee_id, call.id.clone());
        self.calls.insert(call.id.clone(), call);
        Ok(req.call_id)
    }

    pub fn answer(
        &mut self,
        user: &str,
        conn: ConnId,
        chat_id: &str,
        answer: Value,
        now: i64,
    ) -> Result<String> {
        let id = self.call_of(user, chat_id)?;
        let call = self.calls.get_mut(&id).expect("indexed call exists");
        let devices = match &call.phase {
            Phase::Ringing { devices } if call.callee.user == user && devices.contains(&conn) => {
                devices.clone()
            }
            _ => return Err(CallErrorCode::NoSuchCall),
        };
        call.phase = Phase::Active { answered_at: now };
        call.callee.conn = Some(conn);
        call.no_devices_until = None;
        let (caller, caller_conn) = (call.caller.user.clone(), call.caller.conn);
        let data = json!({"chatId": call.chat_id, "callId": call.id, "answer": answer});
        let elsewhere = Self::end_data(call, "answered_elsewhere");
        if let Some(c) = caller_conn {
            self.send(&caller, c, "call:answer", data);
        }
        for d in devices.into_iter().filter(|d| *d != conn) {
            self.send(user, d, "call:end", elsewhere.clone());
        }
        Ok(id)
    }

    pub fn reject(&mut self, user: &str, conn: ConnId, chat_id: &str, now: i64) -> Result<String> {
        let id = self.call_of(user, chat_id)?;
        let call = self.calls.get(&id).expect("indexed call exists");
        let devices = match &call.phase {
            Phase::Ringing { devices } if call.callee.user == user => devices.clone(),
            _ => return Err(CallErrorCode::NoSuchCall),
        };
        let (caller, caller_conn) = (call.caller.user.clone(), call.caller.conn);
        let ids = Self::ids(call);
        let rejected = Self::end_data(call, "rejected");
        if let Some(c) = caller_conn {
            self.send(&caller, c, "call:rejected", ids);
        }
        for d in devices.into_iter().filter(|d| *d != conn) {
            self.send(user, d, "call:end", rejected.clone());
        }
        self.finish(&id, EndReason::Rejected, now);
        Ok(id)
    }

    /// `call:end` from either party: `cancelled` while ringing (a callee's end while ringing is
    /// a reject), `ended` once active.
    pub fn end(&mut self, user: &str, conn: ConnId, chat_id: &str, now: i64) -> Result<String> {
        let id = self.call_of(user, chat_id)?;
        let call = self.calls.get(&id).expect("indexed call exists");
        let is_caller = call.caller.user == user;
        match (&call.phase, is_caller) {
            (Phase::Ringing { .. }, false) => self.reject(user, conn, chat_id, now),
            (Phase::Ringing { devices }, true) => {
                let data = Self::end_data(call, "cancelled");
                let callee = call.callee.user.clone();
                for d in devices.clone() {
                    self.send(&callee, d, "call:end", data.clone());
                }
                self.finish(&id, EndReason::Cancelled, now);
                Ok(id)
            }
            (Phase::Active { .. }, _) => {
                let other = if is_caller {
                    &call.callee
                } else {
                    &call.caller
                };
                let (other_user, other_conn) = (other.user.clone(), other.conn);
                let data = Self::end_data(call, "ended");
                if let Some(c) = other_conn {
                    self.send(&other_user, c, "call:end", data);
                }
                self.finish(&id, EndReason::Ended, now);
                Ok(id)
            }
        }
    }

    pub fn ice_candidate(
        &mut self,
        user: &str,
        conn: ConnId,
        chat_id: &str,
        candidate: Value,
    ) -> Result<String> {
        let id = self.call_of(user, chat_id)?;
        let call = self.calls.get(&id).expect("indexed call exists");
        let data = json!({"chatId": call.chat_id, "callId": call.id, "candidate": candidate, "from": user});
        let targets = if call.caller.user == user {
            if call.caller.conn != Some(conn) {
                return Err(CallErrorCode::NoSuchCall);
            }
            call.callee_targets()
        } else {
            let from_call_device = match &call.phase {
                Phase::Ringing { devices } => devices.contains(&conn),
                Phase::Active { .. } => call.callee.conn == Some(conn),
            };
            if !from_call_device {
                return Err(CallErrorCode::NoSuchCall);
            }
            call.caller_targets()
        };
        self.send_each(targets, "call:ice-candidate", &data);
        Ok(id)
    }

    /// `call:renegotiate` (extension): an SDP offer or answer for an ICE restart or a track
    /// change during an active call, from a party's connection in the call to the other's.
    pub fn renegotiate(
        &mut self,
        user: &str,
        conn: ConnId,
        chat_id: &str,
        description: Value,
    ) -> Result<String> {
        let id = self.call_of(user, chat_id)?;
        let call = self.calls.get(&id).expect("indexed call exists");
        if !matches!(call.phase, Phase::Active { .. }) {
            return Err(CallErrorCode::NoSuchCall);
        }
        let (me, other) = if call.caller.user == user {
            (&call.caller, &call.callee)
        } else {
            (&call.callee, &call.caller)
        };
        if me.conn != Some(conn) {
            return Err(CallErrorCode::NoSuchCall);
        }
        let data = json!({"chatId": call.chat_id, "callId": call.id, "description": description, "from": user});
        let target = other
            .conn
            .map(|c| (other.user.clone(), c))
            .into_iter()
            .collect();
        self.send_each(target, "call:renegotiate", &data);
        Ok(id)
    }

    /// `call:resume` from a party whose connection dropped, on its new connection.
    pub fn resume(
        &mut self,
        user: &str,
        conn: ConnId,
        chat_id: &str,
        call_id: &str,
    ) -> Result<String> {
        let id = self.call_of(user, chat_id)?;
        if id != call_id {
            return Err(CallErrorCode::NoSuchCall);
        }
        let call = self.calls.get_mut(&id).expect("indexed call exists");
        let is_caller = call.caller.user == user;
        if !is_caller && matches!(call.phase, Phase::Ringing { .. }) {
            // A ringing callee has nothing to resume: its new connection already rings.
            return Err(CallErrorCode::NoSuchCall);
        }
        let party = if is_caller {
            &mut call.caller
        } else {
            &mut call.callee
        };
        if party.conn == Some(conn) {
            return Ok(id); // already on this connection
        }
        if party.conn.is_some() {
            return Err(CallErrorCode::NoSuchCall); // the call lives on another connection
        }
        party.conn = Some(conn);
        party.away_until = None;
        let data = Self::ids(call);
        let others = if is_caller {
            call.callee_targets()
        } else {
            call.caller_targets()
        };
        self.send_each(others, "call:peer-resumed", &data);
        Ok(id)
    }

    /// Ends every call (the process is going away for good).
    pub fn shutdown(&mut self, now: i64) {
        let ids: Vec<String> = {
            let mut ids: Vec<String> = self.calls.keys().cloned().collect();
            ids.sort();
            ids
        };
        for id in ids {
            let call = &self.calls[&id];
            let data = Self::end_data(call, "server_shutdown");
            let mut targets = call.caller_targets();
            targets.extend(call.callee_targets());
            self.send_each(targets, "call:end", &data);
            self.finish(&id, EndReason::ServerShutdown, now);
        }
    }

    // ---------------------------------------------------------------- timers

    fn deadlines(call: &Call) -> impl Iterator<Item = i64> {
        let ring = matches!(call.phase, Phase::Ringing { .. }).then_some(call.ring_deadline);
        [
            ring,
            call.no_devices_until,
            call.caller.away_until,
            call.callee.away_until,
        ]
        .into_iter()
        .flatten()
    }

    pub fn poll_timeout(&self) -> Option<i64> {
        self.calls.values().flat_map(Self::deadlines).min()
    }

    pub fn handle_timeout(&mut self, now: i64) {
        let mut due: Vec<(i64, String)> = self
            .calls
            .values()
            .filter_map(|c| {
                Self::deadlines(c)
                    .min()
                    .filter(|d| *d <= now)
                    .map(|d| (d, c.id.clone()))
            })
            .collect();
        due.sort();
        for (_, id) in due {
            self.expire(&id, now);
        }
    }

    /// Applies the earliest expired deadline of one call.
    fn expire(&mut self, id: &str, now: i64) {
        let Some(call) = self.calls.get(id) else {
            return;
        };
        let away = |p: &Party| p.away_until.is_some_and(|t| t <= now);
        if away(&call.caller) || away(&call.callee) {
            // A party did not come back: the other side hears connection_lost.
            let data = Self::end_data(call, "connection_lost");
            let mut targets = Vec::new();
            if !away(&call.caller) {
                targets.extend(call.caller_targets());
            }
            if !away(&call.callee) {
                targets.extend(call.callee_targets());
            }
            self.send_each(targets, "call:end", &data);
            self.finish(id, EndReason::ConnectionLost, now);
            return;
        }
        if call.no_devices_until.is_some_and(|t| t <= now) {
            let data = json!({"chatId": call.chat_id, "code": "offline", "message": CallErrorCode::Offline.message()});
            let caller = call.caller.user.clone();
            if let Some(c) = call.caller.conn {
                self.send(&caller, c, "call:error", data);
            }
            self.finish(id, EndReason::Offline, now);
            return;
        }
        if matches!(call.phase, Phase::Ringing { .. }) && call.ring_deadline <= now {
            let (ids, end) = (Self::ids(call), Self::end_data(call, "no_answer"));
            let (devices, caller) = (call.callee_targets(), call.caller_targets());
            self.send_each(devices, "call:end", &end);
            self.send_each(caller, "call:no-answer", &ids);
            self.finish(id, EndReason::NoAnswer, now);
        }
    }
}
