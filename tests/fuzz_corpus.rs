//! Replays every committed fuzz corpus file (fuzz/corpus/<target>/) through the same entry
//! points the cargo-fuzz targets call (`switchboard::fuzzing`), on stable: a finding fixed once
//! stays fixed, and CI checks the corpus without nightly. Files a fuzzing run added (the corpus
//! grows with `scripts/fuzz.sh`) are replayed the same way.
#![allow(clippy::unwrap_used)]

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("turn_engine", switchboard::fuzzing::turn_engine),
    ("turn_stream", switchboard::fuzzing::turn_stream),
    ("ws_frame", switchboard::fuzzing::ws_frame),
    ("socketio_event", switchboard::fuzzing::socketio_event),
    ("jwt", switchboard::fuzzing::jwt),
    ("config", switchboard::fuzzing::config),
];

#[test]
fn every_corpus_file_replays_without_a_finding() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, run) in TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(
            files.len() >= 3,
            "{name}: a seed corpus of at least 3 files"
        );
        for f in &files {
            let data = std::fs::read(f).unwrap();
            // A panic names the file: the test fails with it.
            eprintln!("{name}: {}", f.display());
            run(&data);
        }
    }
}

/// The entry points are not vacuous: inputs known to reach deep paths do.
#[test]
fn the_entry_points_reach_their_parsers() {
    // A bad TOML value is refused (so `config` does parse and validate).
    assert!(switchboard::config::Config::from_toml_str("[http]\nlisten = 5\n").is_err());
    assert!(switchboard::config::Config::from_toml_str("[turn]\nenabled = false\n").is_ok());
    // A frame that is a request decodes to one.
    let frame = r#"{"event":"typing-start","data":{"chatId":"c"}}"#;
    match switchboard::ws::codec::decode(frame) {
        switchboard::client::session::Incoming::Request { event, data, .. } => {
            assert!(switchboard::wire::Request::decode(&event, data.as_deref()).is_ok())
        }
        _ => panic!("not a request"),
    }
}
