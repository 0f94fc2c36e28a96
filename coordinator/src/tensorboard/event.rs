//! TensorBoard's event file format: TFRecord framing around `tensorflow.Event` protobufs (the public
//! `event.proto` / `summary.proto` schema, field numbers as TensorBoard reads them). Only what the
//! coordinator writes is modelled: the file version, scalar summaries and the session start that
//! makes TensorBoard drop the steps a resumed generation runs again. Records are read back, CRCs
//! checked, to restore the dashboard's curves after a coordinator restart.

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

/// Why a file's records could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file ends inside a record.
    #[error("record at byte {offset} is cut off")]
    Truncated {
        /// Where the record starts.
        offset: usize,
    },
    /// A length or payload does not match its CRC.
    #[error("record at byte {offset}: {what} CRC mismatch")]
    Crc {
        /// Where the record starts.
        offset: usize,
        /// `length` or `data`.
        what: &'static str,
    },
    /// The payload is not an `Event`.
    #[error("record at byte {offset}: not an event")]
    Decode {
        /// Where the record starts.
        offset: usize,
        /// The protobuf error.
        #[source]
        source: prost::DecodeError,
    },
}

/// Every event of a file of TFRecords, each checked against its CRCs.
pub fn read_records(bytes: &[u8]) -> Result<Vec<Event>, RecordError> {
    let mut events = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let truncated = RecordError::Truncated { offset };
        let (len_bytes, len_crc) = match (rest.get(..8), rest.get(8..12)) {
            (Some(l), Some(c)) => (l, c),
            _ => return Err(truncated),
        };
        if masked_crc(len_bytes).to_le_bytes() != len_crc {
            return Err(RecordError::Crc {
                offset,
                what: "length",
            });
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default());
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_add(16))
            .filter(|&end| end <= rest.len())
            .ok_or(truncated)?;
        let data = &rest[12..end - 4];
        if masked_crc(data).to_le_bytes() != rest[end - 4..end] {
            return Err(RecordError::Crc {
                offset,
                what: "data",
            });
        }
        events.push(Event::decode(data).map_err(|source| RecordError::Decode { offset, source })?);
        offset += end;
    }
    Ok(events)
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

    /// What append_record writes reads back; a cut file or a flipped byte is an error, not a
    /// shorter history.
    #[test]
    fn records_read_back_and_damage_is_caught() {
        let events = vec![
            Event::file_version(1.0),
            Event::session_start(2.0, 3, "generation 2 from step 3".into()),
            Event::scalars(3.0, 3, vec![("loss/itc".into(), 0.5)]),
        ];
        let mut out = Vec::new();
        for e in &events {
            append_record(&mut out, e);
        }
        assert_eq!(read_records(&out).unwrap(), events);
        assert!(read_records(&[]).unwrap().is_empty());
        let cut = read_records(&out[..out.len() - 1]).unwrap_err();
        assert!(matches!(cut, RecordError::Truncated { .. }), "{cut}");
        let mut flipped = out.clone();
        let last = flipped.len() - 6;
        flipped[last] ^= 1;
        let err = read_records(&flipped).unwrap_err();
        assert!(
            matches!(err, RecordError::Crc { what: "data", .. }),
            "{err}"
        );
        let mut long = out.clone();
        long[0] = 0xff;
        let err = read_records(&long).unwrap_err();
        assert!(
            matches!(err, RecordError::Crc { what: "length", .. }),
            "{err}"
        );
    }
}
