//! The body of `POST /v1/purge`, parsed and checked: self-contained (serde
//! and the crate's [`Target`] only), so that the fuzz targets in `fuzz/`
//! can include it as it is.

use serde::Deserialize;
use tower_floodgate::purge::{Mode, Target};

/// The most targets in one request (a common CDN cap).
pub(crate) const MAX_TARGETS: usize = 256;

/// The kinds of target a purge request lists.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TargetKind {
    Urls,
    Tags,
    Prefixes,
    Hosts,
}

/// A checked purge: each target with its text as sent.
pub(crate) type Targets = Vec<(String, Target)>;

/// Checks a list of targets of one kind: 1 to [`MAX_TARGETS`] of them,
/// each valid for its kind.
pub(crate) fn check_targets(kind: TargetKind, list: &[String]) -> Result<Targets, String> {
    let make: fn(&str) -> Result<Target, tower_floodgate::purge::InvalidTarget> = match kind {
        TargetKind::Urls => Target::url,
        TargetKind::Tags => Target::tag,
        TargetKind::Prefixes => Target::prefix,
        TargetKind::Hosts => Target::host,
    };
    if list.is_empty() {
        return Err("no targets to purge".to_owned());
    }
    if list.len() > MAX_TARGETS {
        return Err(format!(
            "{} targets: at most {MAX_TARGETS} per request",
            list.len()
        ));
    }
    list.iter()
        .map(|s| make(s).map(|t| (s.clone(), t)).map_err(|e| e.to_string()))
        .collect()
}

/// The purge of everything a tenant has cached (`all` must be true).
pub(crate) fn check_all(all: bool) -> Result<Targets, String> {
    if all {
        Ok(vec![("*".to_owned(), Target::Everything)])
    } else {
        Err("`all` must be true when given".to_owned())
    }
}

/// The body of a purge request: one kind of target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    urls: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    prefixes: Option<Vec<String>>,
    hosts: Option<Vec<String>>,
    all: Option<bool>,
    #[serde(default)]
    soft: bool,
}

impl PurgeRequest {
    /// The targets, checked.
    fn targets(&self) -> Result<Targets, String> {
        let lists = [
            (TargetKind::Urls, &self.urls),
            (TargetKind::Tags, &self.tags),
            (TargetKind::Prefixes, &self.prefixes),
            (TargetKind::Hosts, &self.hosts),
        ];
        let mut given = lists
            .iter()
            .filter_map(|(kind, list)| Some((*kind, list.as_ref()?)));
        match (given.next(), given.next(), self.all) {
            (Some((kind, list)), None, None) => check_targets(kind, list),
            (None, None, Some(all)) => check_all(all),
            _ => Err("give exactly one of `urls`, `tags`, `prefixes`, `hosts` or `all`".to_owned()),
        }
    }
}

/// Parses and checks the body of a purge request: its targets and mode, or
/// what is wrong with it (the detail of a 400).
pub(crate) fn parse(body: &[u8]) -> Result<(Targets, Mode), String> {
    let request: PurgeRequest =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let targets = request.targets()?;
    let mode = if request.soft { Mode::Soft } else { Mode::Hard };
    Ok((targets, mode))
}
