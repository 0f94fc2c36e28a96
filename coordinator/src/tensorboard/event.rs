//! TensorBoard's event file format: TFRecord framing around `tensorflow.Event` protobufs (the public
//! `event.proto` / `summary.proto` schema, field numbers as TensorBoard reads them). Only what the
//! coordinator writes is modelled: the file version, scalar summaries and the session start that
//! makes TensorBoard drop the steps a resumed generation runs again.

use crc::{Crc, CRC_32_ISCSI};
use prost::Message;

/// The first event of every file: TensorBoard checks it to know the format.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event carries.
    #[prost(oneof = "Payload", tags = "3, 5, 7")]
    pub payload: Option<Payload>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    /// `file_version`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// `summary`.
    #[prost(message, tag = "5")]
    Summary(Summary),
    /// `session_log`.
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    /// Its values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value` (TensorBoard's scalar plugin reads these).
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    /// Tag (the chart's name).
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The scalar. A member of the `value` oneof, so a 0.0 is still written (a plain proto3 float
    /// at its default would be left out, and TensorBoard would see no value).
    #[prost(oneof = "ValueKind", tags = "2")]
    pub value: Option<ValueKind>,
}

/// `Summary.Value.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    /// `simple_value`.
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// `tensorflow.SessionLog`.
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// `SessionStatus`: 1 is START.
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// Free text.
    #[prost(string, tag = "3")]
    pub msg: String,
}

/// `SessionLog.SessionStatus.START`: TensorBoard discards what it holds at this step and later.
const SESSION_START: i32 = 1;

impl Event {
    /// The file-version event a file starts with.
    pub fn file_version(wall_time: f64) -> Event {
        Event {
            wall_time,
            step: 0,
            payload: Some(Payload::FileVersion(FILE_VERSION.into())),
        }
    }

    /// Scalars at `step`.
    pub fn scalars(wall_time: f64, step: u64, values: Vec<(String, f32)>) -> Event {
        Event {
            wall_time,
            step: step_i64(step),
            payload: Some(Payload::Summary(Summary {
                value: values
                    .into_iter()
                    .map(|(tag, v)| SummaryValue {
                        tag,
                        value: Some(ValueKind::SimpleValue(v)),
                    })
                    .collect(),
            })),
        }
    }

    /// A restart at `step`: TensorBoard forgets the values of steps `>= step` it read before, so a
    /// generation that resumed from an older checkpoint does not draw its steps twice.
    pub fn session_start(wall_time: f64, step: u64, msg: String) -> Event {
        Event {
            wall_time,
            step: step_i64(step),
            payload: Some(Payload::SessionLog(SessionLog {
                status: SESSION_START,
                msg,
            })),
        }
    }
}

fn step_i64(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}

const CASTAGNOLI: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// TFRecord's masked CRC-32C (the mask keeps a CRC of CRC-framed data from being trivially valid).
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = CASTAGNOLI.checksum(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends `event` as one TFRecord: length, its masked CRC, the bytes, their masked CRC.
pub fn append_record(out: &mut Vec<u8>, event: &Event) {
    let data = event.encode_to_vec();
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&masked_crc(&data).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value, and the record layout: length, masked CRCs, decodable payload.
    #[test]
    fn records_frame_events_as_tfrecord_does() {
        assert_eq!(CASTAGNOLI.checksum(b"123456789"), 0xe306_9283);
        let event = Event::scalars(1.5, 7, vec![("loss/itc".into(), 0.25), ("lr".into(), 0.0)]);
        let mut out = Vec::new();
        append_record(&mut out, &event);
        let len = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 8 + 4 + len + 4);
        let len_crc = u32::from_le_bytes(out[8..12].try_into().unwrap());
        assert_eq!(len_crc, masked_crc(&out[..8]));
        let data = &out[12..12 + len];
        let data_crc = u32::from_le_bytes(out[12 + len..].try_into().unwrap());
        assert_eq!(data_crc, masked_crc(data));
        assert_eq!(Event::decode(data).unwrap(), event);
        // The zero is on the wire: tag 2 (fixed32) of the second value.
        let zero = [0x15, 0, 0, 0, 0];
        assert!(data.windows(zero.len()).any(|w| w == zero), "{data:?}");
    }
}
