//! Decode stage: a Kafka message's value → a typed, validated event, or the reason it is invalid.
//!
//! Guarantee: every message is either an [`Event`] whose ids, timestamps and feature values are
//! valid (non-empty ids of at most 128 bytes, integer `ts` in `0..=`[`MAX_TS_MS`] (year 9999),
//! numbers that are finite as float32, the model's input type), or a
//! [`DecodeError`] whose text says why. Decoding is pure and deterministic, so an invalid message
//! is dead-lettered and committed; it never blocks its partition. The ids in the value are the
//! truth; the message key only routes.

use serde_json::{Map, Value};

use crate::model::FeatureMap;

/// Longest id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Latest event time accepted (ms): 9999-12-31T23:59:59.999Z. Event times are added to (decay
/// intervals, due times); bounding them here keeps every sum far from `i64::MAX`.
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// Which input topic a message came from; it decides the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    FeatureUpdates,
    NewCandidates,
    DecayTicks,
}

impl TopicKind {
    pub fn label(self) -> &'static str {
        match self {
            TopicKind::FeatureUpdates => "feature_updates",
            TopicKind::NewCandidates => "new_candidates",
            TopicKind::DecayTicks => "decay_ticks",
        }
    }
}

/// Whose features an update changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    Member,
    Candidate,
}

/// `catchup.feature-updates`: a partial update; `None` removes the feature.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureUpdate {
    pub entity: Entity,
    pub id: String,
    pub features: Vec<(String, Option<f64>)>,
    pub ts: i64,
}

/// `catchup.new-candidates` upsert: a Catch Up moment for the pair happened at `ts`.
#[derive(Debug, Clone, PartialEq)]
pub struct PairUpsert {
    pub member_id: String,
    pub candidate_id: String,
    pub reason: String,
    pub pair_features: FeatureMap,
    pub ts: i64,
}

/// `catchup.new-candidates` with `"op": "remove"`.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRemove {
    pub member_id: String,
    pub candidate_id: String,
    pub ts: i64,
}

/// `catchup.decay-ticks`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecayTick {
    pub ts: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Features(FeatureUpdate),
    Upsert(PairUpsert),
    Remove(PairRemove),
    Tick(DecayTick),
}

/// Why a message is invalid; the text goes into the dead-letter record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(msg.into()))
}

/// Decodes one message value from a topic of `kind`.
pub fn decode(kind: TopicKind, value: Option<&[u8]>) -> Result<Event, DecodeError> {
    let Some(bytes) = value else {
        return err("message has no value");
    };
    let v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return err(format!("invalid JSON: {e}")),
    };
    let Value::Object(obj) = v else {
        return err("value is not a JSON object");
    };
    match kind {
        TopicKind::FeatureUpdates => decode_features(&obj).map(Event::Features),
        TopicKind::NewCandidates => decode_pair(&obj),
        TopicKind::DecayTicks => Ok(Event::Tick(DecayTick { ts: ts(&obj)? })),
    }
}

fn decode_features(obj: &Map<String, Value>) -> Result<FeatureUpdate, DecodeError> {
    let entity = match str_field(obj, "entity")? {
        "member" => Entity::Member,
        "candidate" => Entity::Candidate,
        other => {
            return err(format!(
                "field `entity` must be \"member\" or \"candidate\", got {other:?}"
            ))
        }
    };
    let id = id_field(obj, "id")?;
    let Some(features) = obj.get("features") else {
        return err("missing field `features`");
    };
    let Value::Object(features) = features else {
        return err("field `features` must be an object");
    };
    let mut out = Vec::with_capacity(features.len());
    for (name, value) in features {
        feature_name(name)?;
        let v = match value {
            Value::Null => None,
            other => Some(number(other, "features", name)?),
        };
        out.push((name.clone(), v));
    }
    Ok(FeatureUpdate {
        entity,
        id,
        features: out,
        ts: ts(obj)?,
    })
}

fn decode_pair(obj: &Map<String, Value>) -> Result<Event, DecodeError> {
    let member_id = id_field(obj, "member_id")?;
    let candidate_id = id_field(obj, "candidate_id")?;
    let ts = ts(obj)?;
    match obj.get("op") {
        None => {}
        Some(Value::String(op)) if op == "remove" => {
            return Ok(Event::Remove(PairRemove {
                member_id,
                candidate_id,
                ts,
            }));
        }
        Some(Value::String(op)) => {
            return err(format!("field `op` must be \"remove\", got {op:?}"))
        }
        Some(_) => return err("field `op` must be a string"),
    }
    let reason = match obj.get("reason") {
        None => return err("missing field `reason` (required unless `op` is \"remove\")"),
        Some(Value::String(r)) if !r.is_empty() => r.clone(),
        Some(_) => return err("field `reason` must be a non-empty string"),
    };
    let mut pair_features = FeatureMap::new();
    match obj.get("pair_features") {
        None | Some(Value::Null) => {}
        Some(Value::Object(pf)) => {
            for (name, value) in pf {
                feature_name(name)?;
                if !value.is_null() {
                    pair_features.insert(name.clone(), number(value, "pair_features", name)?);
                }
            }
        }
        Some(_) => return err("field `pair_features` must be an object"),
    }
    Ok(Event::Upsert(PairUpsert {
        member_id,
        candidate_id,
        reason,
        pair_features,
        ts,
    }))
}

fn str_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, DecodeError> {
    match obj.get(name) {
        None => err(format!("missing field `{name}`")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => err(format!("field `{name}` must be a string")),
    }
}

fn id_field(obj: &Map<String, Value>, name: &str) -> Result<String, DecodeError> {
    let s = str_field(obj, name)?;
    if s.is_empty() {
        return err(format!("field `{name}` must not be empty"));
    }
    if s.len() > MAX_ID_BYTES {
        return err(format!(
            "field `{name}` is {} bytes; ids are at most {MAX_ID_BYTES}",
            s.len()
        ));
    }
    Ok(s.to_owned())
}

fn feature_name(name: &str) -> Result<(), DecodeError> {
    if name.is_empty() || name.len() > MAX_ID_BYTES {
        return err(format!(
            "feature names are 1..={MAX_ID_BYTES} bytes, got {:?}",
            name
        ));
    }
    Ok(())
}

fn ts(obj: &Map<String, Value>) -> Result<i64, DecodeError> {
    match obj.get("ts") {
        None => err("missing field `ts`"),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(t) if t <= MAX_TS_MS as u64 => Ok(t as i64),
            Some(_) => err(format!(
                "field `ts` is after year 9999 (at most {MAX_TS_MS} ms), got {n}"
            )),
            None => err(format!(
                "field `ts` must be a non-negative integer (ms), got {n}"
            )),
        },
        Some(other) => err(format!(
            "field `ts` must be a non-negative integer (ms), got {other}"
        )),
    }
}

fn number(v: &Value, field: &str, name: &str) -> Result<f64, DecodeError> {
    match v {
        Value::Number(n) => match n.as_f64() {
            // The model takes float32: a value past its range would be refused at every
            // rescoring of every pair it touches, so it is refused once, here.
            Some(x) if x.is_finite() && !(x as f32).is_finite() => err(format!(
                "{field}.{name} = {x:e} overflows float32 (largest magnitude {:e})",
                f32::MAX
            )),
            Some(x) if x.is_finite() => Ok(x),
            _ => err(format!("{field}.{name} is not a finite number")),
        },
        other => err(format!(
            "{field}.{name} must be a finite number{}, got {}",
            if field == "features" { " or null" } else { "" },
            type_name(other)
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(kind: TopicKind, s: &str) -> Result<Event, DecodeError> {
        decode(kind, Some(s.as_bytes()))
    }

    fn reason(kind: TopicKind, s: &str) -> String {
        d(kind, s).unwrap_err().0
    }

    #[test]
    fn decodes_each_event_type() {
        let e = d(
            TopicKind::FeatureUpdates,
            r#"{"entity": "member", "id": "m42", "features": {"seniority": 0.7, "gone": null}, "ts": 1764000000000}"#,
        )
        .unwrap();
        let Event::Features(f) = e else { panic!() };
        assert_eq!(f.entity, Entity::Member);
        assert_eq!(f.features.len(), 2);
        assert!(f.features.contains(&("gone".to_string(), None)));

        let e = d(
            TopicKind::NewCandidates,
            r#"{"member_id": "m42", "candidate_id": "m7", "reason": "job_change", "pair_features": {"messages_90d": 3}, "ts": 5}"#,
        )
        .unwrap();
        assert!(
            matches!(e, Event::Upsert(ref u) if u.pair_features["messages_90d"] == 3.0 && u.ts == 5)
        );

        let e = d(
            TopicKind::NewCandidates,
            r#"{"member_id": "m42", "candidate_id": "m7", "op": "remove", "ts": 6}"#,
        )
        .unwrap();
        assert!(matches!(e, Event::Remove(ref r) if r.candidate_id == "m7"));

        assert_eq!(
            d(TopicKind::DecayTicks, r#"{"ts": 1764000000000}"#).unwrap(),
            Event::Tick(DecayTick { ts: 1764000000000 })
        );
    }

    #[test]
    fn rejects_what_the_contract_calls_invalid() {
        use TopicKind::*;
        let cases: &[(TopicKind, &str, &str)] = &[
            (FeatureUpdates, "{not json", "invalid JSON"),
            (FeatureUpdates, "[1, 2]", "not a JSON object"),
            (
                FeatureUpdates,
                r#"{"entity": "group", "id": "g", "features": {}, "ts": 1}"#,
                "`entity`",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "features": {}, "ts": 1}"#,
                "missing field `id`",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": 42, "features": {}, "ts": 1}"#,
                "`id` must be a string",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "", "features": {}, "ts": 1}"#,
                "must not be empty",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": {"a": "1"}, "ts": 1}"#,
                "got a string",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": {"a": true}, "ts": 1}"#,
                "got a boolean",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": {"a": 1e999}, "ts": 1}"#,
                "invalid JSON",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": {"a": NaN}, "ts": 1}"#,
                "invalid JSON",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": [], "ts": 1}"#,
                "`features` must be an object",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": {}, "ts": -1}"#,
                "non-negative integer",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": {}, "ts": 1.5}"#,
                "non-negative integer",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": {}, "ts": "1"}"#,
                "non-negative integer",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "member", "id": "m", "features": {}}"#,
                "missing field `ts`",
            ),
            (
                NewCandidates,
                r#"{"member_id": "m", "candidate_id": "c", "ts": 1}"#,
                "missing field `reason`",
            ),
            (
                NewCandidates,
                r#"{"member_id": "m", "candidate_id": "c", "op": "delete", "ts": 1}"#,
                "`op` must be \"remove\"",
            ),
            (
                NewCandidates,
                r#"{"member_id": "m", "candidate_id": "c", "reason": "x", "pair_features": {"a": "b"}, "ts": 1}"#,
                "pair_features.a",
            ),
            (DecayTicks, r#"{"ts": null}"#, "non-negative integer"),
            (
                DecayTicks,
                r#"{"ts": 9223372036854775807}"#,
                "after year 9999",
            ),
            (DecayTicks, r#"{"ts": 253402300800000}"#, "after year 9999"),
            (
                FeatureUpdates,
                r#"{"entity": "candidate", "id": "c", "features": {"a": 1e39}, "ts": 1}"#,
                "features.a = 1e39 overflows float32",
            ),
            (
                FeatureUpdates,
                r#"{"entity": "candidate", "id": "c", "features": {"a": -3.5e38}, "ts": 1}"#,
                "overflows float32",
            ),
            (
                NewCandidates,
                r#"{"member_id": "m", "candidate_id": "c", "reason": "x", "pair_features": {"a": 1e300}, "ts": 1}"#,
                "pair_features.a = 1e300 overflows float32",
            ),
        ];
        for (kind, input, want) in cases {
            let got = reason(*kind, input);
            assert!(got.contains(want), "{input}: {got}");
        }
        let long = "x".repeat(129);
        let got = reason(
            NewCandidates,
            &format!(r#"{{"member_id": "{long}", "candidate_id": "c", "reason": "r", "ts": 1}}"#),
        );
        assert!(got.contains("129 bytes"), "{got}");
        assert_eq!(
            decode(DecayTicks, None).unwrap_err().0,
            "message has no value"
        );
    }

    #[test]
    fn the_edges_of_the_ranges_are_valid() {
        let tick = format!(r#"{{"ts": {MAX_TS_MS}}}"#);
        assert_eq!(
            d(TopicKind::DecayTicks, &tick).unwrap(),
            Event::Tick(DecayTick { ts: MAX_TS_MS })
        );
        let big = format!(
            r#"{{"entity": "candidate", "id": "c", "features": {{"a": {:e}}}, "ts": 1}}"#,
            f32::MAX
        );
        assert!(d(TopicKind::FeatureUpdates, &big).is_ok(), "{big}");
    }

    #[test]
    fn an_unknown_reason_is_valid() {
        assert!(d(
            TopicKind::NewCandidates,
            r#"{"member_id": "m", "candidate_id": "c", "reason": "endorsement", "ts": 1}"#
        )
        .is_ok());
    }

    #[test]
    fn the_documented_samples_decode_as_documented() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topics/samples");
        for (file, kind) in [
            ("feature-updates", TopicKind::FeatureUpdates),
            ("new-candidates", TopicKind::NewCandidates),
            ("decay-ticks", TopicKind::DecayTicks),
        ] {
            let valid = std::fs::read_to_string(dir.join(format!("{file}.valid.jsonl"))).unwrap();
            for line in valid.lines() {
                assert!(d(kind, line).is_ok(), "{file}: {line}: {:?}", d(kind, line));
            }
            if let Ok(invalid) = std::fs::read_to_string(dir.join(format!("{file}.invalid.jsonl")))
            {
                for line in invalid.lines() {
                    assert!(d(kind, line).is_err(), "{file}: {line} should be refused");
                }
            }
        }
    }
}
