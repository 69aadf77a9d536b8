//! `rescorer`: a nearline rescoring worker for Catch Up recommendations.
//!
//! The stages an event passes through, in order:
//! 1. [`consume`]: the Kafka consumer group over the three input topics;
//! 2. [`decode`]: message value → validated event, or a reason for the dead-letter topic ([`dlq`]);
//! 3. [`store`]: the event's state change applied to Redis under event-time guards;
//! 4. [`coalesce`]: triggers collapse per member and pair inside a batch window;
//! 5. [`expand`]: candidate fan-outs and decay ticks, chunked and interleaved with other input;
//! 6. [`flush`]: load features → build the batch ([`model::features`]) → [`score`] on a blocking
//!    thread ([`model::engine`] runs ONNX Runtime) → guarded score writes to Redis;
//! 7. [`offsets`]: a message's offset is stored once everything it caused is acknowledged.
//!
//! With `state.mode = "owned"` ([`owned`]), stages 3 to 6 run on state held in memory by the
//! owner of each member's partition, written behind to Redis as plain commands.
//!
//! [`worker`] is the loop that drives them; [`app`] wires it from [`config`]. Around it:
//! [`metrics`], [`internal_events`] and [`http`] (what operators see), [`tick`] (decay ticks),
//! [`traffic`] and [`demo`] (synthetic load, the zero-setup first run), and [`cli`].

pub mod app;
pub mod bench;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod consume;
pub mod decode;
pub mod demo;
pub mod dlq;
pub mod expand;
pub mod flush;
pub mod http;
pub mod internal_events;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod owned;
pub mod score;
pub mod store;
pub mod tick;
pub mod traffic;
pub mod worker;
