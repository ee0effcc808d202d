//! The frames a peer sends on the streams it opens, and the answers it
//! gives to this node's requests, as the node checks them:
//!
//! - a stream's first frame (`hypha_node::inbound::opening`): a request,
//!   a DHT message, a punch request, or relay control (`RelayReserve`,
//!   `RelayConnect`, `RelayIncoming`); anything else is a violation;
//! - a request that opens a stream, at the seeder
//!   (`hypha_node::inference::convert::prepare`): a request it prepares
//!   is for a model it serves, with at most the stop strings and messages
//!   allowed, roles it knows, sampling in range and `max_tokens` of at
//!   least one;
//! - what a consumer may send while its request runs
//!   (`hypha_node::inference::serve::consumer_frame`): only a cancel, or a
//!   countersignature for the same request;
//! - the answers to relay control and punch requests
//!   (`hypha_node::services::relay_server::relay_reply`,
//!   `hypha_node::services::punch::punch_reply`).
//!
//! The input is a stream: frames are read one after another, as
//! `FramedRecv` reads them, until one does not decode; or, when its first
//! byte is odd, frames built from it (requests with fields in and out of
//! every limit, cancels, countersignatures for this or another request,
//! relay and punch messages), so that most runs get past the decoder.
#![no_main]

use hypha_node::inbound::{opening, Opening};
use hypha_node::inference::convert::{
    prepare, Prepared, MAX_MESSAGES, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};
use hypha_node::inference::tools::{ToolFormat, MAX_TOOLS};
use hypha_node::inference::prep::Input;
use hypha_node::inference::serve::{consumer_frame, FromConsumer};
use hypha_node::inference::RequestId;
use hypha_node::services::punch::punch_reply;
use hypha_node::services::relay_server::relay_reply;
use hypha_wire::ArchivedMessage;
use hypha_wire::{
    decode_frame, Cancel, ChatMessage, Countersign, FrameEncoder, InferenceRequest, Message,
    ToolCall, ToolChoice, Tools,
    Prompt, PunchReply, Refusal, RelayConnect, RelayIncoming, RelayReply, RelayReserve, Sampling,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// The model the seeder under test serves.
const SERVED: &str = "served-model";
/// Frames read from one input at most.
const MAX_FRAMES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let built;
    let data = match data.split_first() {
        Some((first, rest)) if first & 1 == 1 => {
            built = stream(&mut Unstructured::new(rest)).unwrap_or_default();
            built.as_slice()
        }
        _ => data,
    };
    let mut rest = data;
    let mut first = true;
    let mut request = None;
    for _ in 0..MAX_FRAMES {
        let Ok((msg, used)) = decode_frame(rest) else {
            break;
        };
        rest = rest.get(used..).unwrap_or_default();
        if first {
            first = false;
            request = open(msg);
        }
        if let Some(id) = request {
            running(msg, id);
        }
        answer(msg);
    }
});

/// A stream's first frame; the id of the request it opened, if any.
fn open(msg: &ArchivedMessage) -> Option<RequestId> {
    let opened = opening(msg);
    let may_open = matches!(
        msg,
        ArchivedMessage::Request(_)
            | ArchivedMessage::Dht(_)
            | ArchivedMessage::Punch(_)
            | ArchivedMessage::RelayReserve(_)
            | ArchivedMessage::RelayConnect(_)
            | ArchivedMessage::RelayIncoming(_)
    );
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            assert!(e.is_violation(), "a refused opening is a violation: {e}");
            // Of the messages that open streams, only a DHT request is
            // checked further here.
            assert!(
                !may_open || matches!(msg, ArchivedMessage::Dht(_)),
                "{msg:?} may open a stream"
            );
            return None;
        }
    };
    assert!(may_open, "{msg:?} opened a stream");
    match opened {
        Opening::Request(req) => {
            // What the seeder read is what was sent: it re-encodes to
            // bytes that read back the same (compared as bytes: a float
            // field may be NaN).
            let frame = encode(Message::Request(req.clone()));
            let Ok((ArchivedMessage::Request(back), _)) = decode_frame(&frame) else {
                panic!("a re-encoded request decodes");
            };
            let back = hypha_wire::owned_request(back).expect("a re-encoded request reads back");
            assert_eq!(encode(Message::Request(back)), frame);
            seeder(&req);
            Some(RequestId(req.request_id))
        }
        Opening::Dht(req) => {
            // Checked requests convert for the DHT.
            if let Err(e) = hypha_dht::codec::request_from_wire(req) {
                panic!("a checked DHT request does not convert: {e}");
            }
            None
        }
        Opening::Punch(_)
        | Opening::RelayReserve(_)
        | Opening::RelayConnect(_)
        | Opening::RelayIncoming(_) => None,
    }
}

fn encode(msg: Message) -> Vec<u8> {
    FrameEncoder::new()
        .encode(&msg)
        .expect("a decoded message re-encodes")
        .to_vec()
}

/// A seeder's checks of a request for [`SERVED`].
fn seeder(req: &hypha_wire::InferenceRequest) {
    let models = [SERVED.to_owned(), "alias".to_owned()];
    let format = *[
        ToolFormat::Generic,
        ToolFormat::Hermes,
        ToolFormat::Llama3,
        ToolFormat::Mistral,
    ]
    .get(req.request_id as usize % 4)
    .unwrap_or(&ToolFormat::Generic);
    let Ok(Prepared {
        input,
        request: generate,
        tool_format,
    }) = prepare(req, &models, format)
    else {
        return;
    };
    assert_eq!(tool_format.is_some(), req.tools.is_some());
    assert!(models.contains(&req.model));
    assert!(req.stop.len() <= MAX_STOP_STRINGS);
    assert!(req.stop.iter().all(|s| s.len() <= MAX_STOP_BYTES));
    assert!(generate.sampling.validate().is_ok());
    assert_ne!(generate.max_tokens, Some(0));
    assert_eq!(generate.stop, req.stop);
    match (&input, &req.prompt) {
        (Input::Chat(ms), hypha_wire::Prompt::Chat(wire)) => {
            assert!(!ms.is_empty() && ms.len() <= MAX_MESSAGES);
            assert_eq!(ms.len(), wire.len());
            for (m, w) in ms.iter().zip(wire) {
                assert!(["system", "user", "assistant", "tool"].contains(&m.role.as_str()));
                assert_eq!(m.content, w.content);
            }
        }
        (Input::Tools(chat, f), hypha_wire::Prompt::Chat(wire)) => {
            assert_eq!(*f, format);
            assert_eq!(chat.messages.len(), wire.len());
            for (m, w) in chat.messages.iter().zip(wire) {
                assert_eq!(m.content, w.content);
                assert_eq!(m.tool_calls.len(), w.tool_calls.len());
            }
            if let Some(set) = &chat.tools {
                assert!(!set.tools.is_empty() && set.tools.len() <= MAX_TOOLS);
                assert!(generate.grammar.is_some());
            }
        }
        (Input::Text(t), hypha_wire::Prompt::Text(w)) => assert_eq!(t, w),
        _ => panic!("a prompt changed kind"),
    }
}

/// A frame while request `id` runs, at the seeder.
fn running(msg: &ArchivedMessage, id: RequestId) {
    match consumer_frame(msg, id) {
        Ok(FromConsumer::Cancel) => assert!(matches!(msg, ArchivedMessage::Cancel(_))),
        Ok(FromConsumer::Countersign(sig)) => match msg {
            ArchivedMessage::Countersign(c) => {
                assert_eq!(c.request_id.to_native(), id.0);
                assert_eq!(c.consumer_sig, sig);
            }
            other => panic!("{other:?} read as a countersignature"),
        },
        Err(e) => assert!(e.is_violation(), "{e}"),
    }
}

/// A frame as the answer to this node's relay message or punch request.
fn answer(msg: &ArchivedMessage) {
    let relay = relay_reply(msg);
    assert_eq!(relay.is_ok(), matches!(msg, ArchivedMessage::RelayReply(_)));
    let punch = punch_reply(msg);
    assert_eq!(punch.is_ok(), matches!(msg, ArchivedMessage::PunchReply(_)));
    for e in [relay.err(), punch.err()].into_iter().flatten() {
        assert!(e.is_violation(), "{e}");
    }
}

/// Frames built from the input, one after another.
fn stream(u: &mut Unstructured) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = FrameEncoder::new();
    let n = u.int_in_range(1..=8)?;
    for i in 0..n {
        let msg = if i == 0 { first(u)? } else { later(u)? };
        if let Ok(frame) = encoder.encode(&msg) {
            out.extend_from_slice(frame);
        }
    }
    Ok(out)
}

/// A small number, sometimes just past a limit.
fn count(u: &mut Unstructured, limit: usize) -> Result<usize> {
    if u.ratio(1, 16)? {
        u.int_in_range(0..=limit + 1)
    } else {
        u.int_in_range(0..=3)
    }
}

fn request(u: &mut Unstructured) -> Result<InferenceRequest> {
    let model = if u.ratio(3, 4)? {
        SERVED.to_owned()
    } else {
        u.arbitrary()?
    };
    let prompt = if u.arbitrary()? {
        let n = count(u, MAX_MESSAGES)?;
        let mut ms = Vec::with_capacity(n);
        for _ in 0..n {
            let role = if u.ratio(7, 8)? {
                (*u.choose(&["system", "developer", "user", "assistant", "tool"])?).to_owned()
            } else {
                u.arbitrary()?
            };
            let tool_calls = if u.ratio(1, 8)? {
                vec![ToolCall {
                    id: u.arbitrary()?,
                    name: (*u.choose(&["lookup", "f-1"])?).to_owned(),
                    arguments: if u.arbitrary()? {
                        r#"{"q":"x"}"#.to_owned()
                    } else {
                        u.arbitrary()?
                    },
                }]
            } else {
                Vec::new()
            };
            ms.push(ChatMessage {
                role,
                content: u.arbitrary()?,
                tool_calls,
                tool_call_id: if u.ratio(1, 8)? { Some(u.arbitrary()?) } else { None },
            });
        }
        Prompt::Chat(ms)
    } else {
        Prompt::Text(u.arbitrary()?)
    };
    let near = |u: &mut Unstructured, lo: f32, hi: f32| -> Result<f32> {
        Ok(match u.int_in_range(0..=5)? {
            0 => u.arbitrary()?,
            1 => lo - 0.5,
            2 => hi + 0.5,
            _ => lo + (hi - lo) * f32::from(u.arbitrary::<u8>()?) / 255.0,
        })
    };
    let sampling = Sampling {
        temperature: near(u, 0.0, 2.0)?,
        top_p: near(u, 0.0, 1.0)?,
        top_k: u.int_in_range(-2..=100)?,
        min_p: near(u, 0.0, 1.0)?,
        repeat_penalty: near(u, 0.0, 2.0)?,
        frequency_penalty: near(u, -2.0, 2.0)?,
        presence_penalty: near(u, -2.0, 2.0)?,
        seed: u.arbitrary()?,
    };
    let n = count(u, MAX_STOP_STRINGS)?;
    let mut stop = Vec::with_capacity(n);
    for _ in 0..n {
        stop.push(if u.ratio(1, 8)? {
            "s".repeat(MAX_STOP_BYTES + u.int_in_range(0..=1)?)
        } else {
            u.arbitrary()?
        });
    }
    Ok(InferenceRequest {
        request_id: u.int_in_range(0..=3)?,
        model,
        prompt,
        sampling,
        stop,
        max_tokens: if u.ratio(1, 8)? {
            Some(0)
        } else {
            u.arbitrary()?
        },
        json_schema: match u.int_in_range(0..=7)? {
            0 => Some(r#"{"type":"object","properties":{"a":{"type":"integer"}}}"#.to_owned()),
            1 => Some(u.arbitrary()?),
            _ => None,
        },
        logprobs: u.arbitrary()?,
        max_credits: u.arbitrary()?,
        tools: match u.int_in_range(0..=5)? {
            0 => Some(Tools {
                tools_json: r#"[{"type":"function","function":{"name":"lookup","parameters":{"type":"object","properties":{"q":{"type":"string"}},"required":["q"]}}}]"#.to_owned(),
                choice: *u.choose(&[ToolChoice::Auto, ToolChoice::Required, ToolChoice::Named])?,
                named: (*u.choose(&["lookup", "other", ""])?).to_owned(),
                parallel: u.arbitrary()?,
            }),
            1 => Some(Tools {
                tools_json: u.arbitrary()?,
                choice: ToolChoice::Auto,
                named: String::new(),
                parallel: u.arbitrary()?,
            }),
            _ => None,
        },
    })
}

/// A stream's first frame.
fn first(u: &mut Unstructured) -> Result<Message> {
    Ok(match u.int_in_range(0..=5)? {
        0..=2 => Message::Request(request(u)?),
        3 => Message::RelayReserve(RelayReserve {
            max_sessions: u.arbitrary()?,
        }),
        4 => Message::RelayConnect(RelayConnect {
            target: u.arbitrary()?,
        }),
        _ => Message::RelayIncoming(RelayIncoming {
            from: u.arbitrary()?,
        }),
    })
}

/// A frame after the first.
fn later(u: &mut Unstructured) -> Result<Message> {
    let refusal = |u: &mut Unstructured| -> Result<Option<Refusal>> {
        Ok(if u.arbitrary()? {
            None
        } else {
            Some(*u.choose(&[Refusal::Forbidden, Refusal::TooMany, Refusal::BadRequest])?)
        })
    };
    Ok(match u.int_in_range(0..=4)? {
        0 => Message::Cancel(Cancel {
            request_id: u.int_in_range(0..=3)?,
        }),
        1 => Message::Countersign(Countersign {
            request_id: u.int_in_range(0..=3)?,
            consumer_sig: [u.arbitrary::<u8>()?; 64],
        }),
        2 => Message::RelayReply(RelayReply {
            refusal: refusal(u)?,
        }),
        3 => Message::PunchReply(PunchReply {
            refusal: refusal(u)?,
        }),
        _ => first(u)?,
    })
}
