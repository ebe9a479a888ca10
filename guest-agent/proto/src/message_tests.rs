//! Unit and property tests of the message layer: round trips, typed rejections, compact notices.

use super::*;
use crate::frame::{parse, Parsed};
use proptest::prelude::*;

fn reparse(bytes: &[u8]) -> Frame {
    match parse(bytes) {
        Parsed::Frame { frame, .. } => frame,
        other => panic!("{other:?}"),
    }
}

#[test]
fn requests_round_trip() {
    let reqs = [
        Request::Ping,
        Request::Hash {
            path: "/opt/app/version".into(),
        },
        Request::Exec(ExecRequest {
            command: Command::Argv(vec!["/bin/true".into()]),
            timeout_ms: 1000,
        }),
        Request::Notice(SubstitutionNotice::new(
            "/dev/vda",
            vec![Range {
                offset: 4096,
                len: 4096,
            }],
            vec!["/opt/app/version".into()],
            false,
        )),
        Request::Shutdown,
    ];
    for (i, r) in reqs.iter().enumerate() {
        let f = reparse(&r.to_frame(i as u32 + 1).unwrap());
        assert_eq!(f.id, i as u32 + 1);
        assert_eq!(&Request::from_frame(&f).unwrap(), r);
    }
}

#[test]
fn unknown_type_and_bad_bodies_are_typed() {
    let f = Frame {
        kind: 0x42,
        id: 1,
        payload: b"{}".to_vec(),
    };
    assert!(matches!(
        Request::from_frame(&f),
        Err(MessageError::UnknownType(0x42))
    ));
    let f = Frame {
        kind: kind::HASH,
        id: 1,
        payload: b"{\"path\":".to_vec(),
    };
    assert!(matches!(
        Request::from_frame(&f),
        Err(MessageError::Payload { .. })
    ));
    let f = Frame {
        kind: kind::HASH,
        id: 1,
        payload: br#"{"path":"relative"}"#.to_vec(),
    };
    assert!(matches!(
        Request::from_frame(&f),
        Err(MessageError::Invalid(_))
    ));
    let bad_range = br#"{"device":"/dev/vda","ranges":[{"offset":18446744073709551615,"len":2}],
        "files":[],"files_truncated":false,"metadata_changed":false}"#;
    let f = Frame {
        kind: kind::NOTICE,
        id: 1,
        payload: bad_range.to_vec(),
    };
    assert!(matches!(
        Request::from_frame(&f),
        Err(MessageError::Invalid(_))
    ));
}

#[test]
fn host_rejects_untrusted_replies() {
    let bad = Response::Hash(HashReply {
        path: "/x".into(),
        size: 1,
        blake3: "zz".into(),
    });
    let f = reparse(&bad.to_frame(3).unwrap());
    assert!(matches!(
        Response::from_frame(&f),
        Err(MessageError::Invalid(_))
    ));
    let f = Frame {
        kind: kind::ERROR,
        id: 3,
        payload: br#"{"code":"brand_new","message":"m"}"#.to_vec(),
    };
    assert!(matches!(
        Response::from_frame(&f).unwrap(),
        Response::Error(ErrorReply {
            code: ErrorCode::Unknown,
            ..
        })
    ));
}

#[test]
fn notice_is_compact() {
    let files = (0..MAX_NOTICE_FILES + 3)
        .map(|i| format!("/f{i}"))
        .collect();
    let ranges = vec![
        Range {
            offset: 8192,
            len: 4096,
        },
        Range {
            offset: 0,
            len: 4096,
        },
        Range {
            offset: 4096,
            len: 4096,
        },
        Range {
            offset: 100_000,
            len: 0,
        },
        Range {
            offset: 20_000,
            len: 10,
        },
    ];
    let n = SubstitutionNotice::new("/dev/vda", ranges, files, false);
    assert_eq!(
        n.ranges,
        vec![
            Range {
                offset: 0,
                len: 12288
            },
            Range {
                offset: 20_000,
                len: 10
            }
        ]
    );
    assert_eq!(n.files.len(), MAX_NOTICE_FILES);
    assert!(n.files_truncated);
}

proptest! {
    #[test]
    fn merged_ranges_are_sorted_disjoint_and_cover_the_same_bytes(
        raw in proptest::collection::vec((0u64..10_000, 0u64..500), 0..40)
    ) {
        let ranges: Vec<Range> = raw.iter().map(|&(offset, len)| Range { offset, len }).collect();
        let merged = merge_ranges(ranges.clone());
        for w in merged.windows(2) {
            prop_assert!(w[0].offset + w[0].len < w[1].offset);
        }
        let covered = |rs: &[Range], b: u64| rs.iter().any(|r| b >= r.offset && b < r.offset + r.len);
        for b in (0..10_500).step_by(7) {
            prop_assert_eq!(covered(&ranges, b), covered(&merged, b));
        }
    }

    #[test]
    fn request_decoding_never_panics(kind in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let f = Frame { kind, id: 1, payload };
        let _ = Request::from_frame(&f);
        let _ = Response::from_frame(&f);
    }
}

#[test]
fn exec_output_that_is_not_utf8_travels_as_hex_and_bad_hex_is_refused() {
    let (text, hex) = ExecReply::encode_output(b"ok\n");
    assert_eq!((text.as_str(), hex), ("ok\n", None));
    let (text, hex) = ExecReply::encode_output(&[0x41, 0xff, 0x00]);
    assert_eq!((text.as_str(), hex.as_deref()), ("", Some("41ff00")));
    let reply = |stdout_hex: Option<&str>| {
        Response::Exec(ExecReply {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 1,
            stdout_hex: stdout_hex.map(str::to_string),
            stderr_hex: None,
        })
    };
    let good = reply(Some("41ff00"));
    assert!(good.validate().is_ok());
    if let Response::Exec(e) = &good {
        assert_eq!(e.stdout_bytes(), vec![0x41, 0xff, 0x00]);
    }
    for bad in ["4", "zz", "41FF", &"00".repeat(MAX_OUTPUT + 1)] {
        assert!(reply(Some(bad)).validate().is_err(), "{bad:.8} accepted");
    }
}
