//! A Server-Sent Events parser (the subset of the WHATWG format the executor feed uses:
//! `event:`, `data:` (several lines joined by `\n`), `id:`, comments, blank-line
//! dispatch). Fed bytes as they arrive; a frame split across chunks, or a UTF-8
//! character split across chunks, is put back together.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `message` when the frame names none.
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Incremental parser: [`SseParser::push`] bytes, get the events they complete.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes after the last complete line.
    partial: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.partial.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(newline) = self.partial[start..].iter().position(|&b| b == b'\n') {
            let end = start + newline;
            let mut line = &self.partial[start..end];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            let line = String::from_utf8_lossy(line).into_owned();
            start = end + 1;
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
        }
        self.partial.drain(..start);
        events
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            let id = self.id.take();
            // A frame without data dispatches nothing (as in the WHATWG algorithm).
            return data.map(|data| SseEvent {
                event: event.unwrap_or_else(|| "message".into()),
                data,
                id,
            });
        }
        if line.starts_with(':') {
            return None; // a comment: the server's keepalive
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "id" => self.id = Some(value.to_owned()),
            _ => {} // `retry` and unknown fields: ignored, as the format says
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_parse_the_same() {
        let raw = b"id: 3\nevent: snapshot\ndata: {\"seq\":3}\n\n: keepalive\n\nevent: offline\r\ndata: a\ndata: b\n\n";
        for split in 0..raw.len() {
            let mut parser = SseParser::default();
            let mut events = parser.push(&raw[..split]);
            events.extend(parser.push(&raw[split..]));
            assert_eq!(
                events,
                vec![
                    SseEvent {
                        event: "snapshot".into(),
                        data: "{\"seq\":3}".into(),
                        id: Some("3".into()),
                    },
                    SseEvent {
                        event: "offline".into(),
                        data: "a\nb".into(),
                        id: None,
                    },
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn an_unfinished_frame_is_not_dispatched() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"event: online\ndata: {}\n").is_empty());
        assert_eq!(parser.push(b"\n").len(), 1);
    }
}
