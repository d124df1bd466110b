//! The purge request parser and target validation of the example API
//! (`examples/cdn_purge_api/app/request.rs`, included as it is).
//!
//! Oracle: a body either parses into 1 to 256 targets, each valid for its
//! kind and covering itself, or is refused with a reason; never a panic.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tower_floodgate::purge::{MAX_TAG_LEN, MAX_TARGET_LEN, Target};

#[allow(dead_code)]
#[path = "../../examples/cdn_purge_api/app/request.rs"]
mod request;

#[derive(Arbitrary, Debug)]
enum Input {
    /// Any bytes, as a client may send.
    Raw(Vec<u8>),
    /// Well-formed JSON of arbitrary targets, to reach the validation.
    Json {
        fields: Vec<(Field, Vec<String>)>,
        all: Option<bool>,
        soft: Option<bool>,
    },
    /// The target constructors themselves.
    Targets(Vec<(Field, String)>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Field {
    Urls,
    Tags,
    Prefixes,
    Hosts,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Self::Urls => "urls",
            Self::Tags => "tags",
            Self::Prefixes => "prefixes",
            Self::Hosts => "hosts",
        }
    }

    fn make(self, text: &str) -> Result<Target, tower_floodgate::purge::InvalidTarget> {
        match self {
            Self::Urls => Target::url(text),
            Self::Tags => Target::tag(text),
            Self::Prefixes => Target::prefix(text),
            Self::Hosts => Target::host(text),
        }
    }
}

/// What every valid target satisfies.
fn check_target(text: &str, target: &Target) {
    assert!(target.covers(target), "{target:?} does not cover itself");
    assert!(Target::Everything.covers(target));
    match target {
        Target::Url(u) | Target::Prefix(u) => {
            assert!(u.len() <= MAX_TARGET_LEN);
            assert!(u.starts_with("http://") || u.starts_with("https://"), "{u}");
        }
        Target::Tag(t) => {
            assert_eq!(t, text);
            assert!(!t.is_empty() && t.len() <= MAX_TAG_LEN);
            assert!(t.bytes().all(|b| b.is_ascii_graphic()));
        }
        Target::Host(h) => {
            assert!(!h.is_empty());
            assert_eq!(*h, h.to_ascii_lowercase());
            assert!(!h.contains('@'));
        }
        Target::Everything => assert_eq!(text, "*"),
    }
}

fuzz_target!(|input: Input| {
    let body = match input {
        Input::Raw(bytes) => bytes,
        Input::Json { fields, all, soft } => {
            let mut object = serde_json::Map::new();
            for (field, list) in fields {
                object.insert(field.name().to_owned(), list.into());
            }
            if let Some(all) = all {
                object.insert("all".to_owned(), all.into());
            }
            if let Some(soft) = soft {
                object.insert("soft".to_owned(), soft.into());
            }
            serde_json::to_vec(&object).expect("a JSON object serializes")
        }
        Input::Targets(list) => {
            for (field, text) in list {
                match field.make(&text) {
                    Ok(target) => {
                        check_target(&text, &target);
                        // Valid once, valid again, and the same target.
                        assert_eq!(field.make(&text).ok(), Some(target));
                    }
                    Err(e) => assert!(!e.reason().is_empty() && !e.to_string().is_empty()),
                }
            }
            return;
        }
    };
    match request::parse(&body) {
        Ok((targets, _mode)) => {
            assert!(!targets.is_empty() && targets.len() <= request::MAX_TARGETS);
            for (text, target) in &targets {
                check_target(text, target);
            }
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
});
