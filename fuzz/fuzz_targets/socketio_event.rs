#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| switchboard::fuzzing::socketio_event(data));
