//! Round trips, and hostile bytes that must never panic the decoder.
use hypha_wire::*;
use proptest::prelude::*;

fn deserialize(a: &ArchivedMessage) -> Message {
    rkyv::deserialize::<Message, rkyv::rancor::Error>(a).expect("checked archives deserialize")
}

fn samples() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            public_key: [7; 32],
            capabilities: CAP_SEEDER,
            models: vec!["SmolLM2-135M-Instruct.Q4_1".into()],
            model_sha256: [5; 32],
            context_length: 2048,
            price_prompt_micro: 1,
            price_completion_micro: 4,
            signature: [9; 64],
        }),
        Message::Request(InferenceRequest {
            request_id: 1,
            model: "m".into(),
            prompt: Prompt::Chat(vec![
                ChatMessage {
                    role: "user".into(),
                    content: "héllo €".into(),
                    tool_calls: Vec::new(),
                    tool_call_id: None,
                },
                ChatMessage {
                    role: "assistant".into(),
                    content: String::new(),
                    tool_calls: vec![hypha_wire::ToolCall {
                        id: "call_1".into(),
                        name: "lookup".into(),
                        arguments: r#"{"q":"x"}"#.into(),
                    }],
                    tool_call_id: None,
                },
                ChatMessage {
                    role: "tool".into(),
                    content: "42".into(),
                    tool_calls: Vec::new(),
                    tool_call_id: Some("call_1".into()),
                },
            ]),
            sampling: Sampling {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 40,
                min_p: 0.05,
                repeat_penalty: 1.0,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
                seed: Some(42),
            },
            stop: vec!["\n\n".into()],
            max_tokens: Some(64),
            json_schema: Some(r#"{"type":"object"}"#.into()),
            logprobs: Some(2),
            max_credits: Some(5_000),
            tools: Some(hypha_wire::Tools {
                tools_json: r#"[{"type":"function","function":{"name":"lookup"}}]"#.into(),
                choice: hypha_wire::ToolChoice::Named,
                named: "lookup".into(),
                parallel: false,
            }),
        }),
        Message::Chunk(TokenChunk {
            request_id: 1,
            seq: 0,
            token_ids: vec![1, 2, 3],
            text: "abc".into(),
            logprobs: vec![hypha_wire::TokenLogprob {
                bytes: b"abc".to_vec(),
                logprob: -0.5,
                top: vec![hypha_wire::TopLogprob {
                    bytes: b"abc".to_vec(),
                    logprob: -0.5,
                }],
            }],
        }),
        Message::Done(Done {
            request_id: 1,
            prompt_tokens: 10,
            completion_tokens: 3,
            finish_reason: FinishReason::Length,
            text: String::new(),
            stop_sequence: None,
        }),
        Message::Done(Done {
            request_id: 1,
            prompt_tokens: 10,
            completion_tokens: 3,
            finish_reason: FinishReason::Stop,
            text: "x".into(),
            stop_sequence: Some(1),
        }),
        Message::Error(ErrorReply {
            request_id: 2,
            refusal: Refusal::Busy,
            message: "busy".into(),
        }),
        Message::Cancel(Cancel { request_id: 3 }),
        Message::Receipt(ReceiptOffer {
            request_id: 4,
            receipt: vec![1; 200],
            seeder_sig: [2; 64],
            last: true,
        }),
        Message::Countersign(Countersign {
            request_id: 4,
            consumer_sig: [3; 64],
        }),
        Message::Accepted(Accepted {
            request_id: 5,
            tool_format: Some(hypha_wire::ToolFormat::Hermes),
        }),
        Message::Dht(DhtRequest::FindNode { target: [6; 32] }),
        Message::Dht(DhtRequest::AddProvider {
            key: [1; 32],
            record: Box::new(sample_record()),
        }),
        Message::DhtReply(DhtReply::Providers {
            records: vec![sample_record()],
            closer: vec![WireContact {
                id: [8; 32],
                addr: "127.0.0.1:4000".into(),
            }],
        }),
        Message::DhtReply(DhtReply::Refused),
        Message::RelayReserve(RelayReserve { max_sessions: 8 }),
        Message::RelayConnect(RelayConnect { target: [4; 32] }),
        Message::RelayIncoming(RelayIncoming { from: [5; 32] }),
        Message::RelayReply(RelayReply {
            refusal: Some(Refusal::TooMany),
        }),
        Message::RelayReply(RelayReply { refusal: None }),
        Message::PunchReply(PunchReply {
            refusal: Some(Refusal::Unreachable),
        }),
    ]
}

fn sample_record() -> WireRecord {
    WireRecord {
        publisher: [1; 32],
        public_key: [2; 32],
        addrs: vec!["[::1]:5000".into()],
        relays: vec![format!("{}@127.0.0.1:7000", NodeId([9; 32]))],
        model: "SmolLM2".into(),
        model_sha256: [3; 32],
        context_length: 8192,
        backend: "CPU".into(),
        decode_tokens_per_s: 98,
        free_slots: 4,
        price_prompt_micro: 1,
        price_completion_micro: 4,
        expires_ms: 1_800_000_000_000,
        signature: [4; 64],
    }
}

#[test]
fn every_message_round_trips() {
    let mut enc = FrameEncoder::new();
    for msg in samples() {
        let frame = enc.encode(&msg).unwrap().to_vec();
        let (archived, used) = decode_frame(&frame).unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(deserialize(archived), msg);
    }
}

#[test]
fn stream_decoder_splits_frames_at_any_boundary() {
    let mut enc = FrameEncoder::new();
    let mut wire = Vec::new();
    for msg in samples() {
        wire.extend_from_slice(enc.encode(&msg).unwrap());
    }
    for step in [1, 3, 7, 64, wire.len()] {
        let mut dec = FrameDecoder::default();
        let mut got = Vec::new();
        for piece in wire.chunks(step) {
            dec.push(piece);
            while let Some(m) = dec.next_frame().unwrap() {
                got.push(deserialize(m));
            }
        }
        assert_eq!(got, samples(), "step {step}");
        assert_eq!(dec.buffered(), 0);
    }
}

#[test]
fn oversized_empty_and_truncated_frames_are_told_apart() {
    let too_big = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
    assert_eq!(
        decode_frame(&too_big).unwrap_err(),
        WireError::FrameTooLarge {
            len: MAX_FRAME_BYTES + 1,
            max: MAX_FRAME_BYTES
        }
    );
    assert_eq!(
        decode_frame(&0u32.to_le_bytes()).unwrap_err(),
        WireError::EmptyFrame
    );
    let frame = FrameEncoder::new().encode(&samples()[1]).unwrap().to_vec();
    for cut in 0..frame.len() {
        let err = decode_frame(&frame[..cut]).unwrap_err();
        assert!(err.is_incomplete(), "cut at {cut}: {err}");
    }
    // A header promising more than the cap is refused before any payload.
    let mut dec = FrameDecoder::default();
    dec.push(&too_big);
    assert!(matches!(
        dec.next_frame(),
        Err(WireError::FrameTooLarge { .. })
    ));
}

#[test]
fn garbage_payload_is_invalid() {
    let mut frame = 16u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0xff; 16]);
    let err = decode_frame(&frame).unwrap_err();
    assert!(matches!(err, WireError::Invalid(_)), "{err}");
}

proptest! {
    #[test]
    fn chunks_round_trip(id in any::<u64>(), seq in any::<u32>(),
                         ids in proptest::collection::vec(any::<i32>(), 0..8),
                         text in ".{0,64}") {
        let msg = Message::Chunk(TokenChunk { request_id: id, seq, token_ids: ids, text, logprobs: Vec::new() });
        let frame = FrameEncoder::new().encode(&msg).unwrap().to_vec();
        prop_assert_eq!(deserialize(decode_frame(&frame).unwrap().0), msg);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes);
        let mut dec = FrameDecoder::default();
        dec.push(&bytes);
        while let Ok(Some(_)) = dec.next_frame() {}
    }

    #[test]
    fn bit_flips_never_panic(which in 0usize..6, bit in any::<usize>()) {
        let mut frame = FrameEncoder::new().encode(&samples()[which]).unwrap().to_vec();
        let bit = bit % (frame.len() * 8);
        frame[bit / 8] ^= 1 << (bit % 8);
        if let Ok((m, _)) = decode_frame(&frame) {
            // A flip that still validates must still deserialize.
            let _ = deserialize(m);
        }
    }
}

#[test]
fn relayed_packets_round_trip_in_any_cut() {
    let packets: Vec<Vec<u8>> = vec![
        vec![0xc0; 1200],
        vec![0x40; 37],
        vec![1; MAX_RELAYED_PACKET],
    ];
    let mut stream = Vec::new();
    for p in &packets {
        encode_packet(&mut stream, p).unwrap();
    }
    for cut in [1, 2, 3, 700, 1203, stream.len() - 1] {
        let mut dec = PacketDecoder::default();
        let mut got = Vec::new();
        for part in [&stream[..cut], &stream[cut..]] {
            dec.push(part);
            while let Some(p) = dec.next_packet().unwrap() {
                got.push(p.to_vec());
            }
        }
        assert_eq!(got, packets, "cut at {cut}");
        assert_eq!(dec.buffered(), 0);
    }
}

#[test]
fn relayed_packets_refuse_empty_and_oversized() {
    let mut out = Vec::new();
    assert!(encode_packet(&mut out, &[]).is_err());
    assert!(encode_packet(&mut out, &vec![0; MAX_RELAYED_PACKET + 1]).is_err());
    assert!(out.is_empty());
    let mut dec = PacketDecoder::default();
    dec.push(&[0, 0, 1]);
    assert_eq!(dec.next_packet(), Err(WireError::EmptyFrame));
    let mut dec = PacketDecoder::default();
    dec.push(&((MAX_RELAYED_PACKET + 1) as u16).to_be_bytes());
    assert!(matches!(
        dec.next_packet(),
        Err(WireError::FrameTooLarge { .. })
    ));
}

proptest! {
    #[test]
    fn relayed_packet_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut dec = PacketDecoder::default();
        dec.push(&bytes);
        let mut taken = 0;
        while let Ok(Some(p)) = dec.next_packet() {
            prop_assert!(!p.is_empty() && p.len() <= MAX_RELAYED_PACKET);
            taken += p.len() + PACKET_HEADER_BYTES;
        }
        prop_assert!(taken <= bytes.len());
    }
}
