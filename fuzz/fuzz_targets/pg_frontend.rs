//! Fuzz the PostgreSQL client-side decoding: startup packets, then tagged frames, the message
//! bodies the proxy reads, and classification of the SQL they carry. Any input must give frames
//! or a clean error: no panic, no unbounded allocation, no hang.
//!
//! Run (from fuzz/): AYA_BUILD_SKIP=1 cargo +nightly fuzz run pg_frontend -- -max_total_time=600
#![no_main]

use bytes::BytesMut;
use chaperone::protocols::postgres::{classify::classify, codec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut startup = codec::StartupCodec;
    // Startup phase: any number of SSL/GSS requests, then a startup message.
    loop {
        match startup.decode(&mut buf) {
            Ok(Some(codec::Startup::Startup { .. })) | Ok(None) | Err(_) => break,
            Ok(Some(_)) => continue,
        }
    }
    let mut frames = codec::FrameCodec::default();
    while let Ok(Some(frame)) = frames.decode(&mut buf) {
        match frame.tag {
            b'Q' => {
                if let Ok(sql) = codec::query_sql(&frame) {
                    if sql.len() < 2048 {
                        let _ = classify(sql);
                    }
                }
            }
            b'P' => {
                if let Ok((_, sql)) = codec::parse_sql(&frame) {
                    if sql.len() < 2048 {
                        let _ = classify(sql);
                    }
                }
            }
            b'E' | b'N' => {
                let _ = codec::parse_error_fields(&frame);
            }
            _ => {}
        }
    }
    let _ = codec::complete_frames(data, codec::MAX_FRAME_LEN);
});
