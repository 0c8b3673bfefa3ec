//! `Keys::parse` on arbitrary keys: never panics, and whatever it accepts is
//! exactly the key the builders make for the parsed value (one key, one
//! meaning), with ids that follow the documented rules.
//!
//! Input: a key, or `<prefix>\n<key>` to fuzz the prefix as well.
#![no_main]

use flotilla::owner::model::{is_valid_id, ChangefeedId, Key, Keys};
use libfuzzer_sys::fuzz_target;

fn check(keys: &Keys, key: &str) {
    let Some(parsed) = keys.parse(key) else {
        return;
    };
    let valid_cf = |cf: &ChangefeedId| {
        assert!(is_valid_id(&cf.namespace), "{key:?}: namespace {cf:?}");
        assert!(is_valid_id(&cf.id), "{key:?}: id {cf:?}");
    };
    let valid_executor = |executor: &str| {
        assert!(
            !executor.is_empty() && !executor.contains('/'),
            "{key:?}: executor {executor:?}"
        );
    };
    let rebuilt = match &parsed {
        Key::Executor(id) => {
            valid_executor(id);
            keys.executor(id)
        }
        Key::Owner(lease) => {
            valid_executor(lease);
            format!("{}{lease}", keys.owner_prefix())
        }
        Key::ChangefeedInfo(cf) => {
            valid_cf(cf);
            keys.info(cf)
        }
        Key::ChangefeedStatus(cf) => {
            valid_cf(cf);
            keys.status(cf)
        }
        Key::TaskStatus {
            changefeed,
            executor,
        } => {
            valid_cf(changefeed);
            valid_executor(executor);
            keys.task_status(changefeed, executor)
        }
        Key::TaskPosition {
            changefeed,
            executor,
        } => {
            valid_cf(changefeed);
            valid_executor(executor);
            keys.task_position(changefeed, executor)
        }
    };
    assert_eq!(rebuilt, key, "parsed as {parsed:?}");
    assert!(key.starts_with(&keys.root()));
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    match input.split_once('\n') {
        Some((prefix, key)) => check(&Keys::new(prefix), key),
        None => {
            for prefix in ["/flotilla/default", "/p/", ""] {
                check(&Keys::new(prefix), input);
            }
        }
    }
});
