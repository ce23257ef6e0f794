//! `amends tail`: a live feed of what a deployment publishes: decisions
//! and hold expiries (the decisions stream), apologies and dead letters,
//! one line a message, or one JSON object a line with `--json`.
//!
//! It reads each chosen stream with an ordered consumer: ephemeral, so
//! nothing is left on the server when it stops, and separate from the
//! service's durable consumers, which it never touches. The decisions
//! stream also holds the partitions' ownership records
//! (`<prefix>.owner.<p>`); they are not decisions, and the consumer is
//! filtered to the decision subjects so that they never reach the feed.
//! Messages come in order within each stream; the streams are merged as
//! they arrive.
//!
//! Filters (`--partition`, `--outcome`, `--reason`, `--topic`, `--op-id`)
//! must all match; a message without what a filter looks at does not
//! match it (a dead letter has no outcome, a decision no topic). The
//! partition and topic filters are also given to the server, so that it
//! sends only those subjects.
//!
//! Exit codes: 0 on Ctrl-C or SIGTERM, once `--count` messages are
//! printed, or after `--idle-exit-ms` without one; 2 on an error.

use std::collections::BTreeSet;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use amends_core::command::Topic;
use amends_core::partition::{Apology, HoldExpired};
use amends_core::route::PartitionId;
use amends_core::{Decision, OpId};
use amends_nats::topology::{Prefix, Stream, header};
use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use clap::Args;
use futures_util::StreamExt as _;
use serde_json::{Map, Value};

use crate::audit::{Published, decode_published};
use crate::nats::DeploymentArgs;

/// The most bytes of a dead letter's body (or an unreadable message's)
/// shown on its line; `--json` carries it whole.
const BODY_PREVIEW_BYTES_MAX: usize = 80;

/// The flags of `amends tail`.
#[derive(Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    /// Show decisions and hold expiries (the decisions stream). With none
    /// of --decisions, --apologies and --dead-letters, all three are shown.
    #[arg(long)]
    pub decisions: bool,
    /// Show apologies (refused optimistic operations).
    #[arg(long)]
    pub apologies: bool,
    /// Show dead letters (input without a readable op id).
    #[arg(long)]
    pub dead_letters: bool,
    /// Where to start: `new` (only messages published from now on), `all`
    /// (from the start of each stream), a time ago (`90s`, `15m`, `2h`,
    /// `1d`), an RFC 3339 time (`2026-01-02T03:04:05Z`), or a stream
    /// sequence (with one stream chosen).
    #[arg(long, default_value = "new", value_parser = parse_since)]
    pub since: Since,
    /// Only this partition (repeat the flag for several).
    #[arg(long = "partition", value_name = "P")]
    pub partition: Vec<u32>,
    /// Only decisions (and apologies, whose decision is a refusal) with
    /// this outcome.
    #[arg(long, value_enum)]
    pub outcome: Option<OutcomeFilter>,
    /// Only refusals with this reason code (repeatable), e.g.
    /// `insufficient_funds`.
    #[arg(long = "reason", value_name = "CODE")]
    pub reason: Vec<String>,
    /// Only apologies on this apology topic (repeatable).
    #[arg(long = "topic", value_name = "TOPIC", value_parser = parse_topic)]
    pub topic: Vec<Topic>,
    /// Only messages of this op id (repeatable): a decision's or an
    /// apology's op id, a hold expiry's hold or event id.
    #[arg(long = "op-id", value_name = "OP_ID")]
    pub op_id: Vec<OpId>,
    /// One JSON object a line: the message as published, with `kind`
    /// (`decision`, `hold_expired`, `apology`, `dead_letter`,
    /// `unreadable`), `stream_seq`, `stream_time_ms` and `subject`.
    #[arg(long)]
    pub json: bool,
    /// Exit (0) after printing this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit (0) when no message has arrived for this many milliseconds.
    #[arg(long)]
    pub idle_exit_ms: Option<u64>,
    /// How long to try to connect, in milliseconds, before giving up.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
}

/// `--outcome`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeFilter {
    /// The operation took effect.
    Confirmed,
    /// The operation was refused.
    Rejected,
}

/// `--since`: where each consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Only messages published after the consumer exists.
    New,
    /// From each stream's first message.
    All,
    /// From this stream sequence (of the one stream chosen).
    Sequence(u64),
    /// From the first message stored at or after this time.
    Time(time::OffsetDateTime),
}

fn parse_since(text: &str) -> Result<Since, String> {
    match text {
        "new" => return Ok(Since::New),
        "all" => return Ok(Since::All),
        _ => {}
    }
    if let Ok(seq) = text.parse::<u64>() {
        return Ok(Since::Sequence(seq.max(1)));
    }
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(Since::Time(t));
    }
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&i| i > 0)
        .ok_or_else(|| since_error(text))?;
    let (number, unit) = text.split_at(unit_at);
    let number: u64 = number.parse().map_err(|_| since_error(text))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(since_error(text)),
    };
    let ago = number
        .checked_mul(seconds)
        .and_then(|s| i64::try_from(s).ok())
        .map(time::Duration::seconds)
        .ok_or_else(|| since_error(text))?;
    time::OffsetDateTime::now_utc()
        .checked_sub(ago)
        .map(Since::Time)
        .ok_or_else(|| since_error(text))
}

fn since_error(text: &str) -> String {
    format!(
        "{text:?}: expected new, all, a time ago (90s, 15m, 2h, 1d), an RFC 3339 time or a stream sequence"
    )
}

fn parse_topic(text: &str) -> Result<Topic, String> {
    Topic::new(text).map_err(|e| e.to_string())
}

/// A stream `tail` can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Decisions,
    Apologies,
    DeadLetters,
}

impl Source {
    fn stream(self) -> Stream {
        match self {
            Source::Decisions => Stream::Decisions,
            Source::Apologies => Stream::Apologies,
            Source::DeadLetters => Stream::DeadLetters,
        }
    }
}

/// What one message is, read from its stream.
enum Body {
    Decision(Decision),
    HoldExpired(HoldExpired),
    Apology(Apology),
    DeadLetter {
        partition: Option<u32>,
        /// The requests-stream position of the unreadable request, from
        /// its `Nats-Msg-Id` (`dlq-<p>-<position>`).
        position: Option<u64>,
        /// `Amends-Error`.
        error: String,
    },
    /// A message its stream should not hold, or one of a newer format.
    Unreadable {
        partition: Option<u32>,
    },
}

impl Body {
    fn kind(&self) -> &'static str {
        match self {
            Body::Decision(_) => "decision",
            Body::HoldExpired(_) => "hold_expired",
            Body::Apology(_) => "apology",
            Body::DeadLetter { .. } => "dead_letter",
            Body::Unreadable { .. } => "unreadable",
        }
    }

    fn partition(&self) -> Option<u32> {
        match self {
            Body::Decision(d) => Some(d.partition),
            Body::HoldExpired(e) => Some(e.partition),
            Body::Apology(a) => Some(a.decision.partition),
            Body::DeadLetter { partition, .. } | Body::Unreadable { partition } => *partition,
        }
    }

    fn decision(&self) -> Option<&Decision> {
        match self {
            Body::Decision(d) => Some(d),
            Body::Apology(a) => Some(&a.decision),
            _ => None,
        }
    }

    fn has_op_id(&self, ids: &[OpId]) -> bool {
        match self {
            Body::Decision(d) => ids.contains(&d.op_id),
            Body::Apology(a) => ids.contains(&a.decision.op_id),
            Body::HoldExpired(e) => ids.contains(&e.hold) || ids.contains(&e.event_id),
            Body::DeadLetter { .. } | Body::Unreadable { .. } => false,
        }
    }
}

/// One message as the feed shows it.
struct Event {
    body: Body,
    stream_seq: u64,
    stream_time: time::OffsetDateTime,
    subject: String,
    payload: bytes::Bytes,
}

/// The filters of the command line, checked against every message.
struct Filter {
    partitions: BTreeSet<u32>,
    outcome: Option<OutcomeFilter>,
    reasons: Vec<String>,
    topics: Vec<Topic>,
    op_ids: Vec<OpId>,
}

impl Filter {
    fn matches(&self, body: &Body) -> bool {
        if !self.partitions.is_empty()
            && !body
                .partition()
                .is_some_and(|p| self.partitions.contains(&p))
        {
            return false;
        }
        if let Some(outcome) = self.outcome {
            let found = body.decision().is_some_and(|d| match outcome {
                OutcomeFilter::Confirmed => d.outcome.is_confirmed(),
                OutcomeFilter::Rejected => d.outcome.reason().is_some(),
            });
            if !found {
                return false;
            }
        }
        if !self.reasons.is_empty() {
            let code = body
                .decision()
                .and_then(|d| d.outcome.reason())
                .map(|r| r.code());
            if !code.is_some_and(|c| self.reasons.iter().any(|r| r == c)) {
                return false;
            }
        }
        if !self.topics.is_empty() {
            let Body::Apology(a) = body else {
                return false;
            };
            if !self.topics.contains(&a.topic) {
                return false;
            }
        }
        self.op_ids.is_empty() || body.has_op_id(&self.op_ids)
    }
}

/// Runs the feed until a signal, `--count` or `--idle-exit-ms`.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let deployment = &args.deployment;
    let prefix = deployment.topology_prefix()?;
    let sources = sources(&args);
    if matches!(args.since, Since::Sequence(_)) {
        anyhow::ensure!(
            sources.len() == 1,
            "--since with a stream sequence needs one stream: --decisions, --apologies or --dead-letters"
        );
    }
    let (js, partitions) = deployment
        .jetstream(
            "amends-tail",
            Duration::from_millis(args.connect_timeout_ms),
        )
        .await?;
    let chosen = args
        .partition
        .iter()
        .map(|&p| {
            partitions.id(p).with_context(|| {
                format!(
                    "--partition {p}: the deployment has {} partitions",
                    partitions.get()
                )
            })
        })
        .collect::<anyhow::Result<Vec<PartitionId>>>()?;

    let mut feeds = futures_util::stream::SelectAll::new();
    let mut names = Vec::new();
    for &source in &sources {
        let name = prefix.stream_name(source.stream());
        let stream = js
            .get_stream(&name)
            .await
            .with_context(|| format!("opening the stream {name}"))?;
        let config = consumer::pull::OrderedConfig {
            filter_subjects: filter_subjects(&prefix, source, &chosen, &args.topic),
            deliver_policy: deliver_policy(args.since),
            ..Default::default()
        };
        let messages = stream
            .create_consumer(config)
            .await
            .with_context(|| format!("creating an ordered consumer on {name}"))?
            .messages()
            .await
            .with_context(|| format!("reading {name}"))?;
        feeds.push(messages.map(move |m| (source, m)).boxed());
        names.push(name);
    }
    // Said on stderr, so that a script (or a test) can tell when messages
    // published from now on will be shown.
    eprintln!(
        "amends tail: watching {} (Ctrl-C to stop)",
        names.join(", ")
    );

    let filter = Filter {
        partitions: args.partition.iter().copied().collect(),
        outcome: args.outcome,
        reasons: args.reason.clone(),
        topics: args.topic.clone(),
        op_ids: args.op_id.clone(),
    };
    let style = Style::for_stdout();
    let idle = args.idle_exit_ms.map(Duration::from_millis);
    let mut printed: u64 = 0;
    let signal = crate::serve::shutdown_signal();
    tokio::pin!(signal);
    loop {
        if args.count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
        let next = async {
            match idle {
                Some(idle) => tokio::time::timeout(idle, feeds.next()).await.ok(),
                None => Some(feeds.next().await),
            }
        };
        let item = tokio::select! {
            signal = &mut signal => {
                signal?;
                return Ok(());
            }
            item = next => item,
        };
        let Some(item) = item else {
            return Ok(()); // idle
        };
        let (source, message) = item.context("a stream's consumer ended")?;
        let message = message.map_err(|e| anyhow::anyhow!("reading a stream: {e}"))?;
        let event = read(&prefix, source, &message)?;
        if !filter.matches(&event.body) {
            continue;
        }
        let line = if args.json {
            json_line(&event)?
        } else {
            text_line(&event, style)
        };
        let mut out = std::io::stdout().lock();
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => {}
            // The reader went away (`amends tail | head`): done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
        printed = printed.saturating_add(1);
    }
}

/// The streams the flags choose: all three when none is named.
fn sources(args: &TailArgs) -> Vec<Source> {
    let chosen: Vec<Source> = [
        (args.decisions, Source::Decisions),
        (args.apologies, Source::Apologies),
        (args.dead_letters, Source::DeadLetters),
    ]
    .into_iter()
    .filter_map(|(on, s)| on.then_some(s))
    .collect();
    if chosen.is_empty() {
        vec![Source::Decisions, Source::Apologies, Source::DeadLetters]
    } else {
        chosen
    }
}

/// The subjects a consumer on `source` asks for: the decision subjects
/// only on the decisions stream (never the ownership records beside
/// them), narrowed to the chosen partitions or topics.
fn filter_subjects(
    prefix: &Prefix,
    source: Source,
    partitions: &[PartitionId],
    topics: &[Topic],
) -> Vec<String> {
    match source {
        Source::Decisions if partitions.is_empty() => vec![prefix.dec_wildcard()],
        Source::Decisions => partitions.iter().map(|&p| prefix.dec(p)).collect(),
        Source::DeadLetters if partitions.is_empty() => vec![prefix.dlq_wildcard()],
        Source::DeadLetters => partitions.iter().map(|&p| prefix.dlq(p)).collect(),
        Source::Apologies if topics.is_empty() => vec![prefix.apology_wildcard()],
        Source::Apologies => topics.iter().map(|t| prefix.apology(t)).collect(),
    }
}

fn deliver_policy(since: Since) -> consumer::DeliverPolicy {
    match since {
        Since::New => consumer::DeliverPolicy::New,
        Since::All => consumer::DeliverPolicy::All,
        Since::Sequence(start_sequence) => {
            consumer::DeliverPolicy::ByStartSequence { start_sequence }
        }
        Since::Time(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
    }
}

/// Reads one message of `source`'s stream.
fn read(prefix: &Prefix, source: Source, message: &jetstream::Message) -> anyhow::Result<Event> {
    let info = message
        .info()
        .map_err(|e| anyhow::anyhow!("reading a message's info: {e}"))?;
    let subject = message.subject.as_str().to_owned();
    let partition = subject_partition(&subject);
    let on = |wildcard: String| {
        wildcard
            .strip_suffix('*')
            .is_some_and(|stem| subject.starts_with(stem))
    };
    let body = match source {
        // The consumer's filter keeps ownership records out; a subject
        // check here too, so that one never reads as a decision.
        Source::Decisions if on(prefix.dec_wildcard()) => {
            match decode_published(&message.payload) {
                Some(Published::Decision(d)) => Body::Decision(d),
                Some(Published::HoldExpired(e)) => Body::HoldExpired(e),
                None => Body::Unreadable { partition },
            }
        }
        Source::Apologies => match serde_json::from_slice::<Apology>(&message.payload) {
            Ok(a) => Body::Apology(a),
            Err(_) => Body::Unreadable { partition: None },
        },
        Source::DeadLetters if on(prefix.dlq_wildcard()) => {
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            let position = header(header::MSG_ID)
                .and_then(|id| id.rsplit_once('-').and_then(|(_, p)| p.parse().ok()));
            Body::DeadLetter {
                partition,
                position,
                error: header(header::ERROR).unwrap_or_default(),
            }
        }
        Source::Decisions | Source::DeadLetters => Body::Unreadable { partition: None },
    };
    Ok(Event {
        body,
        stream_seq: info.stream_sequence,
        stream_time: info.published,
        subject,
        payload: message.payload.clone(),
    })
}

/// The partition a `<prefix>.<kind>.<p>` subject names.
fn subject_partition(subject: &str) -> Option<u32> {
    subject.rsplit_once('.').and_then(|(_, p)| p.parse().ok())
}

/// `--json`: the message as published (a JSON object; a dead letter's raw
/// body as `body`, or `body_hex` when it is not UTF-8), with where it was.
fn json_line(event: &Event) -> anyhow::Result<String> {
    let mut object = match &event.body {
        Body::DeadLetter { .. } | Body::Unreadable { .. } => Map::new(),
        _ => serde_json::from_slice::<Map<String, Value>>(&event.payload)
            .context("re-reading a message as JSON")?,
    };
    match &event.body {
        Body::DeadLetter {
            partition,
            position,
            error,
        } => {
            object.insert("partition".into(), (*partition).into());
            object.insert("position".into(), (*position).into());
            object.insert("error".into(), error.clone().into());
            insert_raw(&mut object, &event.payload);
        }
        Body::Unreadable { .. } => insert_raw(&mut object, &event.payload),
        _ => {}
    }
    object.insert("kind".into(), event.body.kind().into());
    object.insert("stream_seq".into(), event.stream_seq.into());
    let ms = event.stream_time.unix_timestamp_nanos() / 1_000_000;
    object.insert(
        "stream_time_ms".into(),
        u64::try_from(ms).unwrap_or(0).into(),
    );
    object.insert("subject".into(), event.subject.clone().into());
    Ok(Value::Object(object).to_string())
}

fn insert_raw(object: &mut Map<String, Value>, payload: &[u8]) {
    match std::str::from_utf8(payload) {
        Ok(text) => object.insert("body".into(), text.into()),
        Err(_) => object.insert("body_hex".into(), hex(payload).into()),
    };
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// ANSI colours on a terminal (unless `NO_COLOR` is set), none elsewhere.
#[derive(Clone, Copy)]
struct Style {
    colour: bool,
}

impl Style {
    fn for_stdout() -> Style {
        Style {
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    /// `text` in the colour of `code` (an SGR number).
    fn paint(self, code: u8, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

const GREEN: u8 = 32;
const RED: u8 = 31;
const YELLOW: u8 = 33;
const MAGENTA: u8 = 35;
const CYAN: u8 = 36;

/// One readable line: time (UTC, of the stream), kind, partition, position,
/// op id, then what happened.
fn text_line(event: &Event, style: Style) -> String {
    let time = utc(event.stream_time);
    let head = |kind: &str, colour: u8, partition: Option<u32>, position: Option<u64>| {
        let partition = partition.map_or_else(|| "p?".to_owned(), |p| format!("p{p}"));
        let position = position.map_or_else(|| "@?".to_owned(), |p| format!("@{p}"));
        format!(
            "{time} {} {partition:<4} {position:<8}",
            style.paint(colour, &format!("{kind:<12}"))
        )
    };
    match &event.body {
        Body::Decision(d) => {
            let (colour, what) = outcome(d, style);
            format!(
                "{} {} {what}",
                head("decision", colour, Some(d.partition), Some(d.position)),
                d.op_id
            )
        }
        Body::HoldExpired(e) => format!(
            "{} {} hold {} on {}: {} released",
            head("hold_expired", CYAN, Some(e.partition), Some(e.position)),
            e.event_id,
            e.hold,
            e.account,
            e.amount
        ),
        Body::Apology(a) => {
            let (_, what) = outcome(&a.decision, style);
            let command = serde_json::to_value(&a.command).unwrap_or(Value::Null);
            let kind = command.get("type").and_then(Value::as_str).unwrap_or("?");
            format!(
                "{} {} topic={} refused {kind}{}: {what}",
                head(
                    "apology",
                    MAGENTA,
                    Some(a.decision.partition),
                    Some(a.decision.position)
                ),
                a.decision.op_id,
                a.topic.as_str(),
                fields(&command, "type")
            )
        }
        Body::DeadLetter {
            partition,
            position,
            error,
        } => format!(
            "{} {}: {}",
            head("dead_letter", YELLOW, *partition, *position),
            error,
            preview(&event.payload)
        ),
        Body::Unreadable { partition } => format!(
            "{} {} #{}: {}",
            head("unreadable", YELLOW, *partition, None),
            event.subject,
            event.stream_seq,
            preview(&event.payload)
        ),
    }
}

/// A decision's outcome with its key fields, and its colour; for a
/// transfer, what it moves.
fn outcome(d: &Decision, style: Style) -> (u8, String) {
    let (colour, mut text) = outcome_only(d, style);
    if let Some(t) = &d.transfer {
        text.push_str(&format!(
            " transfer from={} to={} amount={}",
            t.from.as_str(),
            t.to.as_str(),
            t.amount.get()
        ));
    }
    (colour, text)
}

fn outcome_only(d: &Decision, style: Style) -> (u8, String) {
    let value = serde_json::to_value(&d.outcome).unwrap_or(Value::Null);
    match d.outcome.reason() {
        None => (
            GREEN,
            format!(
                "{}{}",
                style.paint(GREEN, "confirmed"),
                fields(&value, "outcome")
            ),
        ),
        Some(reason) => {
            let reason = serde_json::to_value(reason).unwrap_or(Value::Null);
            let code = reason.get("code").and_then(Value::as_str).unwrap_or("?");
            (
                RED,
                format!(
                    "{} {code}{}",
                    style.paint(RED, "rejected"),
                    fields(&reason, "code")
                ),
            )
        }
    }
}

/// ` key=value` for every field of a JSON object but `skip` (nested values
/// as compact JSON, strings bare).
fn fields(value: &Value, skip: &str) -> String {
    let Some(object) = value.as_object() else {
        return String::new();
    };
    object
        .iter()
        .filter(|(k, _)| k.as_str() != skip)
        .map(|(k, v)| match v {
            Value::String(s) => format!(" {k}={s}"),
            other => format!(" {k}={other}"),
        })
        .collect()
}

/// The start of a raw body, escaped as a Rust string literal would be.
fn preview(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    let mut shown: String = text.chars().take(BODY_PREVIEW_BYTES_MAX).collect();
    while shown.len() > BODY_PREVIEW_BYTES_MAX {
        shown.pop();
    }
    let more = if shown.len() < text.len() { "…" } else { "" };
    format!("{shown:?}{more} ({} bytes)", payload.len())
}

/// `2026-01-02T03:04:05.678Z`.
fn utc(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_reads_every_documented_form() {
        // Proves `--since` takes new, all, a sequence, a time ago and an RFC 3339 time, and refuses anything else with the forms it takes.
        assert_eq!(parse_since("new"), Ok(Since::New));
        assert_eq!(parse_since("all"), Ok(Since::All));
        assert_eq!(parse_since("42"), Ok(Since::Sequence(42)));
        assert_eq!(parse_since("0"), Ok(Since::Sequence(1)));
        let Ok(Since::Time(t)) = parse_since("2026-01-02T03:04:05Z") else {
            panic!("an RFC 3339 time");
        };
        assert_eq!(t.unix_timestamp(), 1_767_323_045);
        let now = time::OffsetDateTime::now_utc();
        for (text, seconds) in [("90s", 90), ("15m", 900), ("2h", 7_200), ("1d", 86_400)] {
            let Ok(Since::Time(t)) = parse_since(text) else {
                panic!("{text}: a time ago");
            };
            let ago = (now - t).whole_seconds();
            assert!((seconds - 5..=seconds + 5).contains(&ago), "{text}: {ago}");
        }
        for bad in ["", "latest", "m5", "5w", "-5m", "99999999999999999999d"] {
            let e = parse_since(bad).expect_err(bad);
            assert!(e.contains("expected new, all"), "{bad}: {e}");
        }
    }

    /// The uncoloured text line of a decision message whose JSON is `d`.
    fn decision_line(d: serde_json::Value) -> String {
        let d: Decision = serde_json::from_value(d).expect("a decision");
        let event = Event {
            body: Body::Decision(d),
            stream_seq: 3,
            stream_time: time::OffsetDateTime::from_unix_timestamp(1_767_323_045).expect("a time"),
            subject: "amends.dec.0".to_owned(),
            payload: bytes::Bytes::new(),
        };
        text_line(&event, Style { colour: false })
    }

    #[test]
    fn the_text_line_shows_a_refusal_with_its_fields() {
        // Proves a rejected decision's line names partition, position, op id, outcome and the reason's fields, without colour off a terminal.
        let line = decision_line(serde_json::json!({
            "op_id": "018bcfe5-8b28-7003-8000-00000000000a", "partition": 0, "position": 10,
            "log_time_ms": 1_700_000_009_000_u64, "outcome": "rejected",
            "reason": { "code": "ceiling_exceeded", "balance": 60, "ceiling": 100, "requested": 50 }
        }));
        assert_eq!(
            line,
            "2026-01-02T03:04:05.000Z decision     p0   @10      018bcfe5-8b28-7003-8000-00000000000a rejected ceiling_exceeded balance=60 ceiling=100 requested=50"
        );
    }

    #[test]
    fn the_text_line_of_a_transfer_says_what_it_moves() {
        // Proves a transfer's final decision line names its from, to and amount after the outcome.
        let line = decision_line(serde_json::json!({
            "op_id": "018bcff4-aa40-705a-8000-000000000101", "partition": 0, "position": 7,
            "log_time_ms": 1_700_001_000_000_u64, "outcome": "confirmed",
            "transfer": { "from": "acct-x1", "to": "acct-y2", "amount": 30 }
        }));
        assert_eq!(
            line,
            "2026-01-02T03:04:05.000Z decision     p0   @7       018bcff4-aa40-705a-8000-000000000101 confirmed transfer from=acct-x1 to=acct-y2 amount=30"
        );
    }
}
