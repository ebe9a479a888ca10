//! The host <-> guest-agent protocol, the one place both sides take it from: frames (`frame`),
//! messages (`message`) and the host's client (`client`).
//! Invariant: nothing acts on channel bytes before `frame::parse` and `*::from_frame` accepted them.

pub mod client;
pub mod frame;
pub mod message;
pub mod text;

pub use client::{AgentClient, AgentLink, ClientError};
pub use frame::{Decoder, Frame, FrameError, MAX_PAYLOAD, VERSION};
pub use message::{
    merge_ranges, Command, ErrorCode, ErrorReply, ExecReply, ExecRequest, HashReply, HookRun,
    MessageError, Mount, NoticeAck, Pong, ProcessHit, Range, Request, Response, Step,
    SubstitutionNotice,
};
