//! The call signaling state machine (PROTOCOL §2.2), pure: no tokio, no sockets, no clock.
//!
//! Inputs are a user's signals (from one of their connections), connection up/down events and
//! `now` (unix ms). Outputs are [`Command`]s, drained with [`Machine::poll_command`] after every
//! input: typed [`CallEvent`]s addressed to connections (the shell serialises each once, for
//! all its targets) and records of finished calls. [`Machine::poll_timeout`] says when
//! [`Machine::handle_timeout`] is due next. A signal's own success or failure is its return
//! value (the shell turns failures into `call:error` / `call:busy` pushes and failed replies).
//!
//! Access checks that need the store (the chat exists, the caller is in it, it is direct) are
//! made by the shell before [`Machine::initiate`], and the shell says which connections the
//! callee has (the hub is the one registry of who is connected); everything about who is
//! engaged or ringing lives here.

use std::collections::{BTreeSet, HashMap, VecDeque};

pub use crate::hub::ConnId;
pub use crate::wire::calls::{
    CallErrorCode, CallEvent, CallIds, CallType, Candidate, EndReason, Sdp,
};

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Push `event` to each of these connections (a user and one of their connections).
    Send {
        to: Vec<(String, ConnId)>,
        event: CallEvent,
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

/// A `call:initiate` that passed the store checks. Serialisable: in a cluster it travels to
/// the node that runs the machine.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Initiate {
    /// Chosen by the shell (randomness is a parameter too).
    pub call_id: String,
    pub chat_id: String,
    pub callee_id: String,
    pub call_type: CallType,
    pub offer: Sdp,
    /// The callee's live connections now (they all ring): filled in by the machine's shell.
    #[serde(skip)]
    pub callee_devices: Vec<ConnId>,
}

/// A signal from a connection: decoded, and for `Initiate` checked against the store.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Signal {
    Initiate(Initiate),
    Answer {
        chat_id: String,
        answer: Sdp,
    },
    Reject {
        chat_id: String,
    },
    End {
        chat_id: String,
    },
    Ice {
        chat_id: String,
        candidate: Candidate,
    },
    Resume {
        chat_id: String,
        call_id: String,
    },
    Renegotiate {
        chat_id: String,
        description: Sdp,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Party {
    user: String,
    /// `None` while the party's connection is gone (inside the reconnect grace).
    conn: Option<ConnId>,
    /// When the grace runs out.
    away_until: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Call {
    id: String,
    chat_id: String,
    call_type: CallType,
    offer: Sdp,
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
    calls: HashMap<String, Call>,
    /// Engaged users → their call.
    by_user: HashMap<String, String>,
    commands: VecDeque<Command>,
}

type Result<T> = std::result::Result<T, CallErrorCode>;

/// A call's whole state, for another machine to take over (in a cluster, when the node that
/// ran the calls died). Opaque outside the machine; compared to save only what changed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CallSnapshot(Call);

impl CallSnapshot {
    pub fn call_id(&self) -> &str {
        &self.0.id
    }
}

impl Machine {
    pub fn new(ring_timeout_ms: i64, grace_ms: i64) -> Self {
        Self {
            ring_timeout_ms,
            grace_ms,
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

    fn send(&mut self, user: &str, conn: ConnId, event: CallEvent) {
        self.send_each(vec![(user.to_owned(), conn)], event);
    }

    fn send_each(&mut self, to: Vec<(String, ConnId)>, event: CallEvent) {
        if !to.is_empty() {
            self.commands.push_back(Command::Send { to, event });
        }
    }

    fn ids(call: &Call) -> CallIds {
        CallIds {
            chat_id: call.chat_id.clone(),
            call_id: call.id.clone(),
        }
    }

    fn end_event(call: &Call, reason: EndReason) -> CallEvent {
        CallEvent::End {
            chat_id: call.chat_id.clone(),
            call_id: call.id.clone(),
            reason,
        }
    }

    fn offer_event(call: &Call) -> CallEvent {
        CallEvent::Offer {
            chat_id: call.chat_id.clone(),
            call_id: call.id.clone(),
            caller_id: call.caller.user.clone(),
            call_type: call.call_type,
            offer: call.offer.clone(),
        }
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
            // Already ringing there when the call began after the connection registered.
            if devices.insert(conn) {
                call.no_devices_until = None;
                let event = Self::offer_event(call);
                self.send(user, conn, event);
            }
        }
    }

    pub fn connection_down(&mut self, user: &str, conn: ConnId, now: i64) {
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
            let (others, ids) = (call.callee_targets(), Self::ids(call));
            self.send_each(others, CallEvent::PeerReconnecting(ids));
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
                    let (caller, ids) = (call.caller_targets(), Self::ids(call));
                    self.send_each(caller, CallEvent::PeerReconnecting(ids));
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

    /// Applies one signal of `user` from `conn`; the call id on success.
    pub fn signal(&mut self, user: &str, conn: ConnId, signal: Signal, now: i64) -> Result<String> {
        match signal {
            Signal::Initiate(req) => self.initiate(user, conn, req, now),
            Signal::Answer { chat_id, answer } => self.answer(user, conn, &chat_id, answer, now),
            Signal::Reject { chat_id } => self.reject(user, conn, &chat_id, now),
            Signal::End { chat_id } => self.end(user, conn, &chat_id, now),
            Signal::Ice { chat_id, candidate } => {
                self.ice_candidate(user, conn, &chat_id, candidate)
            }
            Signal::Resume { chat_id, call_id } => self.resume(user, conn, &chat_id, &call_id),
            Signal::Renegotiate {
                chat_id,
                description,
            } => self.renegotiate(user, conn, &chat_id, description),
        }
    }

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
        let devices: BTreeSet<ConnId> = req.callee_devices.iter().copied().collect();
        if devices.is_empty() {
            return Err(CallErrorCode::Offline);
        }
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
        let event = Self::offer_event(&call);
        let to = devices
            .iter()
            .map(|d| (req.callee_id.clone(), *d))
            .collect();
        self.send_each(to, event);
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
        answer: Sdp,
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
        let caller = call.caller_targets();
        let answered = CallEvent::Answer {
            chat_id: call.chat_id.clone(),
            call_id: call.id.clone(),
            answer,
        };
        let elsewhere = Self::end_event(call, EndReason::AnsweredElsewhere);
        self.send_each(caller, answered);
        let others = devices
            .into_iter()
            .filter(|d| *d != conn)
            .map(|d| (user.to_owned(), d))
            .collect();
        self.send_each(others, elsewhere);
        Ok(id)
    }

    pub fn reject(&mut self, user: &str, conn: ConnId, chat_id: &str, now: i64) -> Result<String> {
        let id = self.call_of(user, chat_id)?;
        let call = self.calls.get(&id).expect("indexed call exists");
        let devices = match &call.phase {
            Phase::Ringing { devices } if call.callee.user == user => devices.clone(),
            _ => return Err(CallErrorCode::NoSuchCall),
        };
        let caller = call.caller_targets();
        let ids = Self::ids(call);
        let rejected = Self::end_event(call, EndReason::Rejected);
        self.send_each(caller, CallEvent::Rejected(ids));
        let others = devices
            .into_iter()
            .filter(|d| *d != conn)
            .map(|d| (user.to_owned(), d))
            .collect();
        self.send_each(others, rejected);
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
            (Phase::Ringing { .. }, true) => {
                let (devices, event) = (
                    call.callee_targets(),
                    Self::end_event(call, EndReason::Cancelled),
                );
                self.send_each(devices, event);
                self.finish(&id, EndReason::Cancelled, now);
                Ok(id)
            }
            (Phase::Active { .. }, _) => {
                let other = if is_caller {
                    &call.callee
                } else {
                    &call.caller
                };
                let target = other
                    .conn
                    .map(|c| (other.user.clone(), c))
                    .into_iter()
                    .collect();
                let event = Self::end_event(call, EndReason::Ended);
                self.send_each(target, event);
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
        candidate: Candidate,
    ) -> Result<String> {
        let id = self.call_of(user, chat_id)?;
        let call = self.calls.get(&id).expect("indexed call exists");
        let event = CallEvent::IceCandidate {
            chat_id: call.chat_id.clone(),
            call_id: call.id.clone(),
            candidate,
            from: user.to_owned(),
        };
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
        self.send_each(targets, event);
        Ok(id)
    }

    /// `call:renegotiate` (extension): an SDP offer or answer for an ICE restart or a track
    /// change during an active call, from a party's connection in the call to the other's.
    pub fn renegotiate(
        &mut self,
        user: &str,
        conn: ConnId,
        chat_id: &str,
        description: Sdp,
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
        let event = CallEvent::Renegotiate {
            chat_id: call.chat_id.clone(),
            call_id: call.id.clone(),
            description,
            from: user.to_owned(),
        };
        let target = other
            .conn
            .map(|c| (other.user.clone(), c))
            .into_iter()
            .collect();
        self.send_each(target, event);
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
        let ids = Self::ids(call);
        let others = if is_caller {
            call.callee_targets()
        } else {
            call.caller_targets()
        };
        self.send_each(others, CallEvent::PeerResumed(ids));
        Ok(id)
    }

    /// Ends every call (the process is going away for good).
    pub fn shutdown(&mut self, now: i64) {
        self.end_all(now, EndReason::ServerShutdown);
    }

    /// The state of every call, by id.
    pub fn snapshots(&self) -> HashMap<String, CallSnapshot> {
        self.calls
            .iter()
            .map(|(id, c)| (id.clone(), CallSnapshot(c.clone())))
            .collect()
    }

    /// Takes over a call another machine ran. Its deadlines stay as they were. If one of its
    /// users is engaged here meanwhile, it ends at once (`connection_lost`).
    pub fn restore(&mut self, snap: CallSnapshot, now: i64) {
        let call = snap.0;
        if self.calls.contains_key(&call.id) {
            return;
        }
        let clash = [&call.caller.user, &call.callee.user]
            .into_iter()
            .any(|u| self.by_user.contains_key(u));
        let id = call.id.clone();
        if !clash {
            self.by_user.insert(call.caller.user.clone(), id.clone());
            self.by_user.insert(call.callee.user.clone(), id.clone());
        }
        self.calls.insert(id.clone(), call);
        if clash {
            let call = &self.calls[&id];
            let event = Self::end_event(call, EndReason::ConnectionLost);
            let mut targets = call.caller_targets();
            targets.extend(call.callee_targets());
            self.send_each(targets, event);
            self.finish(&id, EndReason::ConnectionLost, now);
        }
    }

    /// Every connection a call counts on now (the parties', the ringing devices).
    pub fn live_connections(&self) -> Vec<(String, ConnId)> {
        let mut out = Vec::new();
        for c in self.calls.values() {
            out.extend(c.caller_targets());
            out.extend(c.callee_targets());
        }
        out
    }

    /// Forgets every call without a word (another machine runs them now).
    pub fn forget_all(&mut self) {
        self.calls.clear();
        self.by_user.clear();
    }

    /// Whether the machine runs the call `id`.
    pub fn has_call(&self, id: &str) -> bool {
        self.calls.contains_key(id)
    }

    /// Ends every call with `reason`.
    pub fn end_all(&mut self, now: i64, reason: EndReason) {
        let ids: Vec<String> = {
            let mut ids: Vec<String> = self.calls.keys().cloned().collect();
            ids.sort();
            ids
        };
        for id in ids {
            let call = &self.calls[&id];
            let event = Self::end_event(call, reason);
            let mut targets = call.caller_targets();
            targets.extend(call.callee_targets());
            self.send_each(targets, event);
            self.finish(&id, reason, now);
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
            let event = Self::end_event(call, EndReason::ConnectionLost);
            let mut targets = Vec::new();
            if !away(&call.caller) {
                targets.extend(call.caller_targets());
            }
            if !away(&call.callee) {
                targets.extend(call.callee_targets());
            }
            self.send_each(targets, event);
            self.finish(id, EndReason::ConnectionLost, now);
            return;
        }
        if call.no_devices_until.is_some_and(|t| t <= now) {
            let event = CallEvent::failure(
                Some(call.chat_id.clone()),
                CallErrorCode::Offline.as_str(),
                CallErrorCode::Offline.message().to_owned(),
            );
            let caller = call.caller_targets();
            self.send_each(caller, event);
            self.finish(id, EndReason::Offline, now);
            return;
        }
        if matches!(call.phase, Phase::Ringing { .. }) && call.ring_deadline <= now {
            let (ids, end) = (Self::ids(call), Self::end_event(call, EndReason::NoAnswer));
            let (devices, caller) = (call.callee_targets(), call.caller_targets());
            self.send_each(devices, end);
            self.send_each(caller, CallEvent::NoAnswer(ids));
            self.finish(id, EndReason::NoAnswer, now);
        }
    }
}
