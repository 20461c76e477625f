//! Call signaling of PROTOCOL §2.2 on the wire: the requests, the typed events the calls machine
//! addresses to connections, and the codes and reasons both speak.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{payload, Push};
use crate::error::ApiError;

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

impl CallType {
    pub fn parse(s: &str) -> Option<CallType> {
        [CallType::Audio, CallType::Video]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

impl<'de> Deserialize<'de> for CallType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        CallType::parse(&s).ok_or_else(|| serde::de::Error::custom("audio or video"))
    }
}

impl Serialize for CallType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why a call ended: the `reason` of `call:end`, and what is recorded.
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
    /// Sent to the callee's other devices when one answered; never recorded (the call goes on).
    AnsweredElsewhere,
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
            EndReason::AnsweredElsewhere => "answered_elsewhere",
        }
    }
}

impl Serialize for EndReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The codes of `call:error` the calls machine decides (the store checks add `forbidden`,
/// `not_found` and `unsupported`).
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

    pub fn parse(s: &str) -> Option<CallErrorCode> {
        [
            CallErrorCode::CallerBusy,
            CallErrorCode::Offline,
            CallErrorCode::Busy,
            CallErrorCode::NoSuchCall,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
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

/// An SDP offer or answer (`RTCSessionDescriptionInit`); other fields are dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sdp {
    #[serde(rename = "type")]
    pub kind: String,
    pub sdp: String,
}

/// An `RTCIceCandidateInit`, or null for end-of-candidates: relayed exactly as the client sent
/// it, never looked into.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Candidate(Option<Box<RawValue>>);

impl Candidate {
    pub fn json(&self) -> &str {
        self.0.as_deref().map_or("null", RawValue::get)
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl From<&str> for Candidate {
    /// A candidate from its JSON text (tests; invalid JSON is null).
    fn from(json: &str) -> Self {
        Candidate(RawValue::from_string(json.to_owned()).ok())
    }
}

/// A call request, decoded.
#[derive(Debug)]
pub enum CallRequest {
    Initiate(InitiateReq),
    Answer(AnswerReq),
    Reject(ChatOnly),
    End(ChatOnly),
    Ice(IceReq),
    Resume(ResumeReq),
    Renegotiate(RenegotiateReq),
}

impl CallRequest {
    pub fn decode(event: &str, data: Option<&RawValue>) -> Result<CallRequest, ApiError> {
        Ok(match event {
            "call:initiate" => {
                let req: InitiateWire = payload(data)?;
                let call_type = match req.call_type.as_str() {
                    "audio" => CallType::Audio,
                    "video" => CallType::Video,
                    _ => return Err(ApiError::bad_request("callType: \"audio\" or \"video\"")),
                };
                Self::Initiate(InitiateReq {
                    chat_id: req.chat_id,
                    offer: req.offer,
                    call_type,
                })
            }
            "call:answer" => Self::Answer(payload(data)?),
            "call:reject" => Self::Reject(payload(data)?),
            "call:end" => Self::End(payload(data)?),
            "call:ice-candidate" => Self::Ice(payload(data)?),
            "call:resume" => Self::Resume(payload(data)?),
            "call:renegotiate" => Self::Renegotiate(payload(data)?),
            other => return Err(ApiError::bad_request(format!("unknown event `{other}`"))),
        })
    }

    /// The chat the request is about.
    pub fn chat_id(&self) -> &str {
        match self {
            Self::Initiate(r) => &r.chat_id,
            Self::Answer(r) => &r.chat_id,
            Self::Reject(r) | Self::End(r) => &r.chat_id,
            Self::Ice(r) => &r.chat_id,
            Self::Resume(r) => &r.chat_id,
            Self::Renegotiate(r) => &r.chat_id,
        }
    }
}

/// The `chatId` string of call data, if it has one (failures name it even when the rest of the
/// data was bad).
pub fn chat_id_of(data: Option<&RawValue>) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "chatId", default)]
        chat_id: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_str(data?.get()).ok()?;
    match probe.chat_id? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitiateWire {
    chat_id: String,
    offer: Sdp,
    call_type: String,
}

#[derive(Debug)]
pub struct InitiateReq {
    pub chat_id: String,
    pub offer: Sdp,
    pub call_type: CallType,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnswerReq {
    pub chat_id: String,
    pub answer: Sdp,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatOnly {
    pub chat_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceReq {
    pub chat_id: String,
    #[serde(default)]
    pub candidate: Candidate,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenegotiateReq {
    pub chat_id: String,
    pub description: Sdp,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeReq {
    pub chat_id: String,
    pub call_id: String,
}

/// The reply of a call request that worked.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallIdReply<'a> {
    pub call_id: &'a str,
}

/// `{chatId, callId}`, the data of several call events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallIds {
    pub chat_id: String,
    pub call_id: String,
}

/// An event of a call, addressed by the calls machine to connections.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged, rename_all_fields = "camelCase")]
pub enum CallEvent {
    Offer {
        chat_id: String,
        call_id: String,
        caller_id: String,
        call_type: CallType,
        offer: Sdp,
    },
    Answer {
        chat_id: String,
        call_id: String,
        answer: Sdp,
    },
    End {
        chat_id: String,
        call_id: String,
        reason: EndReason,
    },
    Rejected(CallIds),
    NoAnswer(CallIds),
    PeerReconnecting(CallIds),
    PeerResumed(CallIds),
    IceCandidate {
        chat_id: String,
        call_id: String,
        candidate: Candidate,
        from: String,
    },
    Renegotiate {
        chat_id: String,
        call_id: String,
        description: Sdp,
        from: String,
    },
    /// `call:error` `{chatId, code, message}`.
    Error {
        chat_id: Option<String>,
        code: &'static str,
        message: String,
    },
    /// `call:busy` `{chatId}`: the callee is engaged (which call stays private).
    Busy {
        chat_id: Option<String>,
    },
}

impl CallEvent {
    pub fn name(&self) -> &'static str {
        match self {
            CallEvent::Offer { .. } => "call:offer",
            CallEvent::Answer { .. } => "call:answer",
            CallEvent::End { .. } => "call:end",
            CallEvent::Rejected(_) => "call:rejected",
            CallEvent::NoAnswer(_) => "call:no-answer",
            CallEvent::PeerReconnecting(_) => "call:peer-reconnecting",
            CallEvent::PeerResumed(_) => "call:peer-resumed",
            CallEvent::IceCandidate { .. } => "call:ice-candidate",
            CallEvent::Renegotiate { .. } => "call:renegotiate",
            CallEvent::Error { .. } => "call:error",
            CallEvent::Busy { .. } => "call:busy",
        }
    }

    /// The failure of a call request: `call:busy` for a busy callee, `call:error` otherwise.
    pub fn failure(chat_id: Option<String>, code: &'static str, message: String) -> CallEvent {
        if code == CallErrorCode::Busy.as_str() {
            CallEvent::Busy { chat_id }
        } else {
            CallEvent::Error {
                chat_id,
                code,
                message,
            }
        }
    }

    /// Serialised once, for every connection it goes to.
    pub fn push(&self) -> Arc<Push> {
        Push::new(self.name(), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn data(e: &CallEvent) -> Value {
        serde_json::from_str(e.push().data_json()).unwrap()
    }

    /// A call event crosses nodes as (event, data): every one must be rebuildable there.
    #[test]
    fn every_call_event_is_a_known_push() {
        let ids = || CallIds {
            chat_id: "c".into(),
            call_id: "k".into(),
        };
        let sdp = || Sdp {
            kind: "offer".into(),
            sdp: "v=0".into(),
        };
        let all = [
            CallEvent::Offer {
                chat_id: "c".into(),
                call_id: "k".into(),
                caller_id: "a".into(),
                call_type: CallType::Audio,
                offer: sdp(),
            },
            CallEvent::Answer {
                chat_id: "c".into(),
                call_id: "k".into(),
                answer: sdp(),
            },
            CallEvent::Rejected(ids()),
            CallEvent::NoAnswer(ids()),
            CallEvent::PeerReconnecting(ids()),
            CallEvent::PeerResumed(ids()),
            CallEvent::Renegotiate {
                chat_id: "c".into(),
                call_id: "k".into(),
                description: sdp(),
                from: "a".into(),
            },
            CallEvent::End {
                chat_id: "c".into(),
                call_id: "k".into(),
                reason: EndReason::AnsweredElsewhere,
            },
            CallEvent::IceCandidate {
                chat_id: "c".into(),
                call_id: "k".into(),
                candidate: Candidate::from(r#"{"candidate":"x"}"#),
                from: "a".into(),
            },
            CallEvent::failure(None, "busy", "busy".into()),
            CallEvent::failure(None, "offline", "offline".into()),
        ];
        for e in all {
            let push = e.push();
            let data = serde_json::value::RawValue::from_string(push.data_json().into()).unwrap();
            let again = crate::wire::Push::from_parts(push.event(), data, None)
                .unwrap_or_else(|| panic!("{} is missing from PUSH_EVENTS", e.name()));
            assert_eq!(again.data_json(), push.data_json());
        }
    }

    #[test]
    fn events_look_as_the_protocol_says() {
        let offer = CallEvent::Offer {
            chat_id: "c".into(),
            call_id: "k".into(),
            caller_id: "a".into(),
            call_type: CallType::Video,
            offer: Sdp {
                kind: "offer".into(),
                sdp: "v=0".into(),
            },
        };
        assert_eq!(offer.name(), "call:offer");
        assert_eq!(
            data(&offer),
            json!({"chatId": "c", "callId": "k", "callerId": "a", "callType": "video",
                   "offer": {"type": "offer", "sdp": "v=0"}})
        );
        let end = CallEvent::End {
            chat_id: "c".into(),
            call_id: "k".into(),
            reason: EndReason::AnsweredElsewhere,
        };
        assert_eq!(
            data(&end),
            json!({"chatId": "c", "callId": "k", "reason": "answered_elsewhere"})
        );
        let ice = CallEvent::IceCandidate {
            chat_id: "c".into(),
            call_id: "k".into(),
            candidate: Candidate::from(r#"{"candidate":"x","sdpMid":"0"}"#),
            from: "a".into(),
        };
        assert_eq!(
            data(&ice),
            json!({"chatId": "c", "callId": "k", "candidate": {"candidate": "x", "sdpMid": "0"}, "from": "a"})
        );
        let busy = CallEvent::failure(Some("c".into()), "busy", "the user is busy".into());
        assert_eq!(
            (busy.name(), data(&busy)),
            ("call:busy", json!({"chatId": "c"}))
        );
        let err = CallEvent::failure(None, "offline", "the user is offline".into());
        assert_eq!(
            (err.name(), data(&err)),
            (
                "call:error",
                json!({"chatId": null, "code": "offline", "message": "the user is offline"})
            )
        );
        let ids = CallEvent::NoAnswer(CallIds {
            chat_id: "c".into(),
            call_id: "k".into(),
        });
        assert_eq!(
            (ids.name(), data(&ids)),
            ("call:no-answer", json!({"chatId": "c", "callId": "k"}))
        );
    }

    #[test]
    fn a_candidate_is_relayed_as_sent_and_null_when_absent() {
        let d = RawValue::from_string(r#"{"chatId":"c"}"#.into()).unwrap();
        let CallRequest::Ice(req) = CallRequest::decode("call:ice-candidate", Some(&d)).unwrap()
        else {
            panic!("an ice request")
        };
        assert_eq!(req.candidate.json(), "null");
        let d = RawValue::from_string(r#"{"chatId":"c","candidate":null}"#.into()).unwrap();
        let CallRequest::Ice(req) = CallRequest::decode("call:ice-candidate", Some(&d)).unwrap()
        else {
            panic!("an ice request")
        };
        assert_eq!(req.candidate.json(), "null");
    }

    #[test]
    fn initiate_checks_the_call_type() {
        let d = RawValue::from_string(
            r#"{"chatId":"c","offer":{"type":"offer","sdp":"x"},"callType":"fax"}"#.into(),
        )
        .unwrap();
        let e = CallRequest::decode("call:initiate", Some(&d)).unwrap_err();
        assert_eq!(e.message, "callType: \"audio\" or \"video\"");
        assert_eq!(chat_id_of(Some(&d)), Some("c".into()));
    }
}
