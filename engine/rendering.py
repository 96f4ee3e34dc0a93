"""One report, four formats: what every `epreuve` listing and report prints.

A command builds its report as plain data (engine/reports.py), turns it into blocks here
(a Note is a sentence, a Listing a table, a Log a container's log tail), and prints them
as one of:

- `table`: rich tables for people. Piped, the console has no width limit, and no
  column is ever cut with an ellipsis (a long word folds onto the next line instead):
  two teams whose names differ at the 40th character never look the same.
- `tsv`: one header row then rows per listing, tab-separated; in a field a backslash,
  tab, newline or carriage return is written `\\\\`, `\\t`, `\\n`, `\\r`. Titles,
  sentences and log lines are comment lines starting with `#`; listings are separated
  by an empty line.
- `markdown`: headings, GitHub pipe tables and fenced logs; a cell escapes `|` and the
  characters that would make text a link, HTML or emphasis.
- `json`: the report data itself, nothing rendered (`--json` is its alias).

Text a participant or organiser chose (team names, messages, logs, metric names) goes
through reports.terminal_text in table, tsv and markdown: controls are shown as escapes.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from rich.console import Console, ConsoleDimensions
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from runners.messages import human_bytes

# shown as escapes: C0 controls but line feed and tab, DEL, C1 controls, direction and
# zero-width marks
_NOT_INERT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e"
                        r"\u2066-\u2069]")

# wide enough for any line a report prints: piped output is never wrapped nor cut
UNBOUNDED_WIDTH = 1_000_000


def terminal_text(text: object) -> str:
    """`text` as a terminal shows it without acting on it: each control character escaped."""
    return _NOT_INERT.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                     else f"\\u{ord(m.group()):04x}"), str(text))


class Format(StrEnum):
    TABLE = "table"
    TSV = "tsv"
    MARKDOWN = "markdown"
    JSON = "json"


FORMAT_HELP = ("table (for people; full width when piped), tsv, markdown, or json (the data "
               "itself, as --json).")


def chosen_format(output_format: Format, as_json: bool = False) -> Format:
    """`--json` is kept as the alias of `--format json`."""
    return Format.JSON if as_json else output_format


class PipeAwareConsole(Console):
    """A terminal's own width on a terminal; an unbounded width when the output is piped or
    redirected, so that no table, name or value is cut at 80 columns."""

    @property
    def size(self) -> ConsoleDimensions:
        measured = super().size
        if self.is_terminal:
            return measured
        return ConsoleDimensions(UNBOUNDED_WIDTH, measured.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


@dataclass(frozen=True)
class Note:
    """A sentence. Its text is shown as it is (never rich markup)."""

    text: str
    style: str | None = None


@dataclass(frozen=True)
class Listing:
    """A table: `right` names the columns aligned right (numbers); a listing without a
    header is a field/value panel."""

    title: str | None
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    right: frozenset[str] = field(default_factory=frozenset)
    header: bool = True


@dataclass(frozen=True)
class Log:
    title: str
    text: str


Block = Note | Listing | Log


# -- printing ------------------------------------------------------------------------------

def show(console: Console, output_format: Format, data: Any,
         blocks: Callable[[Any], Iterable[Block]]) -> None:
    """Print `data` in `output_format`: JSON is the data; the others render its blocks."""
    if output_format == Format.JSON:
        _write(console, json.dumps(data, default=str) + "\n")
    elif output_format == Format.TSV:
        _write(console, tsv(list(blocks(data))))
    elif output_format == Format.MARKDOWN:
        _write(console, markdown(list(blocks(data))))
    else:
        print_table(console, blocks(data))


def _write(console: Console, text: str) -> None:
    """Machine formats bypass rich: no wrapping, no markup, no highlighting."""
    stream: TextIO = console.file
    stream.write(text)
    stream.flush()


def print_table(console: Console, blocks: Iterable[Block]) -> None:
    for block in blocks:
        if isinstance(block, Note):
            console.print(Text(terminal_text(block.text), style=block.style or ""),
                          soft_wrap=True)
        elif isinstance(block, Log):
            console.print(Text(terminal_text(block.title), style="dim"), soft_wrap=True)
            console.print(Text(terminal_text(block.text)), soft_wrap=True)
        else:
            console.print(_rich_table(block))


def _rich_table(listing: Listing) -> Table | Panel:
    title = Text(terminal_text(listing.title)) if listing.title else None
    table = Table(title=title) if listing.header else Table(show_header=False, box=None)
    for column in listing.columns:
        # fold, never an ellipsis: a cut value or name is a wrong value or name
        table.add_column(Text(terminal_text(column)), overflow="fold",
                         justify="right" if column in listing.right else "left")
    for row in listing.rows:
        table.add_row(*(Text(_cell(value)) for value in row))
    return table if listing.header else Panel(table, title=title, expand=False)


def _cell(value: object) -> str:
    """A cell is one line: a tab or line break in a name is shown as its escape, so that a
    name never looks like two rows or two names."""
    return terminal_text(value).replace("\t", "\\t").replace("\n", "\\n")


# -- tsv -----------------------------------------------------------------------------------

_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def tsv_field(value: object) -> str:
    """One field: inert, and with no tab or line break left to split it."""
    return re.sub(r"[\\\t\n\r]", lambda m: _TSV_ESCAPES[m.group()], terminal_text(value))


def tsv(blocks: list[Block]) -> str:
    sections: list[list[str]] = []
    for block in blocks:
        if isinstance(block, Note):
            sections.append([f"# {tsv_field(block.text)}"])
        elif isinstance(block, Log):
            sections.append([f"# {tsv_field(block.title)}"]
                            + [f"# {tsv_field(line)}" for line in block.text.splitlines()])
        else:
            lines = [f"# {tsv_field(block.title)}"] if block.title else []
            if block.header:
                lines.append("\t".join(tsv_field(c) for c in block.columns))
            lines += ["\t".join(tsv_field(cell) for cell in row) for row in block.rows]
            sections.append(lines)
    return _join_sections(sections)


def _join_sections(sections: list[list[str]]) -> str:
    """Consecutive comment lines stay together; each listing is set apart by an empty line."""
    out: list[str] = []
    for lines in sections:
        if out and not (lines[0].startswith("#") and len(lines) == 1
                        and out[-1].startswith("#")):
            out.append("")
        out += lines
    return "\n".join(out) + "\n" if out else ""


# -- markdown ------------------------------------------------------------------------------

# what turns text into a link, HTML, emphasis, code or a table cell boundary
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#!])")


def markdown_text(value: object) -> str:
    """Inline text: inert, every character that markdown would act on escaped, and line
    breaks as <br> (a cell is one line)."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", terminal_text(value))
    return escaped.replace("\r\n", "\n").replace("\n", "<br>")


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in the text: the text cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def markdown(blocks: list[Block]) -> str:
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, Note):
            parts.append(markdown_text(block.text))
        elif isinstance(block, Log):
            text = terminal_text(block.text)
            fence = _fence(text)
            parts.append(f"{markdown_text(block.title)}\n\n{fence}text\n{text.rstrip()}\n"
                         f"{fence}")
        else:
            parts.append(_markdown_table(block))
    return "\n\n".join(parts) + "\n" if parts else ""


def _markdown_table(listing: Listing) -> str:
    columns = listing.columns if listing.header else ("field", "value")
    lines = [f"### {markdown_text(listing.title)}", ""] if listing.title else []
    lines.append("| " + " | ".join(markdown_text(c) for c in columns) + " |")
    lines.append("|" + "|".join("---:" if c in listing.right else "---" for c in columns)
                 + "|")
    lines += ["| " + " | ".join(markdown_text(cell) for cell in row) + " |"
              for row in listing.rows]
    return "\n".join(lines)


# -- help texts ----------------------------------------------------------------------------

def unwrapped(text: str) -> str:
    """A docstring or help string as rich should print it: one line per paragraph. The
    source wraps at 100 columns; rich keeps a single line break where typer passes it on
    (a group's list of commands, a help text's later paragraphs)."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


def unwrap_help(command: Any) -> None:
    """Unwrap the help of a click command, its parameters and every subcommand."""
    if command.help:
        command.help = unwrapped(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = unwrapped(param.help)
    for sub in getattr(command, "commands", {}).values():
        unwrap_help(sub)


# -- the reports as blocks -----------------------------------------------------------------

def _number(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def queue_blocks(report: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Listing("queue", ("state", "jobs"),
                                   [(state, str(count))
                                    for state, count in sorted(report["jobs"].items())],
                                   right=frozenset({"jobs"}))]
    if report.get("running"):
        blocks.append(Listing("active jobs", ("job", "submission", "status", "worker",
                                              "heartbeat"),
                              [(str(j["job"]), str(j["submission"]), j["status"],
                                j["worker"] or "-", str(j["heartbeat_at"] or "-"))
                               for j in report["running"]],
                              right=frozenset({"job", "submission"})))
    return blocks


def status_blocks(report: dict[str, Any]) -> list[Block]:
    """`epreuve status [ID]`: the queue, or one submission as submission_report returned it
    (already cut to what the viewer may see: no `cases` key, no per-case results)."""
    if "submission" not in report:
        return queue_blocks(report)
    status = report["status"] + (f": {report['reason']}" if report["reason"] else "")
    blocks: list[Block] = [Note(f"submission {report['submission']} ({report['team']}, "
                                f"{report['challenge']}/{report['phase']}): {status}", "bold")]
    if report.get("message"):
        blocks.append(Note(report["message"]))
    if "queue" in report:
        eta = report["queue"]["estimated_start_seconds"]
        blocks.append(Note(f"queued: {report['queue']['jobs_ahead']} job(s) ahead"
                           + (f", starts in about {eta} s" if eta is not None else "")))
    if report.get("prize_note"):
        blocks.append(Note(report["prize_note"], "yellow"))
    if report.get("stale"):
        blocks.append(Note(f"computed on dataset version {report['dataset_version'][:12]}, "
                           "older than the phase's current one (epreuve rescore)", "yellow"))
    blocks.append(Listing("jobs", ("job", "kind", "cases", "status", "reason", "wall",
                                   "peak memory"),
                          [(str(j["job"]), j["kind"], str(j["cases"]), j["status"],
                            j["reason"] or "-", _seconds(j["wall_seconds"]),
                            human_bytes(j["peak_memory_bytes"]) if j["peak_memory_bytes"]
                            else "-") for j in report["jobs"]],
                          right=frozenset({"job", "cases", "wall", "peak memory"})))
    blocks += [Log(f"job {j['job']} log (tail):", j["log_tail"][-1500:])
               for j in report["jobs"] if j.get("log_tail")]
    for again in report.get("reproductions") or []:
        moved = ", ".join(again["metrics_moved"])
        blocks.append(Note(f"reproduction {again['id']} ({again['source']} image "
                           f"{again['image_id'][:19]}): {again['verdict']}"
                           + (f"; moved: {moved}" if moved else "")))
    if report.get("cases"):
        blocks.append(cases_listing("per-case results", report["cases"]))
    if report["aggregates"]:
        blocks.append(_aggregates(report["aggregates"]))
    return blocks


def cases_listing(title: str, cases: list[dict[str, Any]]) -> Listing:
    """One row per case: whether its output was valid, each metric, its runtime, and the
    message of an invalid one."""
    metrics: list[str] = []
    for case in cases:
        metrics += [m for m in case.get("metrics") or {} if m not in metrics]
    with_messages = any(not c["valid"] and c.get("message") for c in cases)
    columns = ("case", "result", *metrics, "runtime") + (("message",) if with_messages else ())
    rows = []
    for case in cases:
        values = case.get("metrics") or {}
        row = (case["case_id"], "valid" if case["valid"] else (case.get("reason") or "invalid"),
               *(_number(values.get(m)) for m in metrics),
               _seconds(case.get("runtime_seconds")))
        if with_messages:
            row += ("" if case["valid"] else case.get("message") or "",)
        rows.append(row)
    return Listing(title, columns, rows, right=frozenset({*metrics, "runtime"}))


def _aggregates(aggregates: dict[str, dict[str, Any]]) -> Listing:
    rows = []
    for metric, s in sorted(aggregates.items()):
        if "mean" in s:
            rows.append((metric, _number(s["mean"]), _number(s["median"]),
                         f"{_number(s['ci_low'])} - {_number(s['ci_high'])}", str(s["n_failed"])))
        else:
            rows.append((metric, _number(s["value"]), "-", "-", str(s["n_failed"])))
    return Listing("aggregates (failed cases at their worst value)",
                   ("metric", "mean", "median", "95% CI", "failed"), rows,
                   right=frozenset({"mean", "median", "95% CI", "failed"}))


STALE_MARK = " *"  # a leaderboard entry computed on an older dataset version


def leaderboard_report(challenge: str, phase: str, entries: list,
                       stability: dict[str, Any] | None = None) -> dict[str, Any]:
    """The leaderboard as data: what `--format json` prints and the other formats show."""
    from dataclasses import asdict

    return {"challenge": challenge, "phase": phase, "entries": [asdict(e) for e in entries],
            "stability": stability}


def gc_blocks(report: dict[str, Any]) -> list[Block]:
    """`epreuve store gc`: engine.retention.report's data."""
    verb = "would remove" if report["dry_run"] else "removed"
    blocks: list[Block] = [Note(
        f"{verb} {len(report['removed'])} blob(s), {human_bytes(report['bytes_freed'])}, "
        f"and {report['stale_incoming_removed']} stale temporary file(s) "
        f"(grace period: {report['grace_days']:g} days)", "bold")]
    if report["removed"]:
        blocks.append(Listing(verb, ("sha256", "size", "last used", "what"),
                              [(r["sha256"][:16], human_bytes(r["bytes"]),
                                r["last_used"][:19], r["what"]) for r in report["removed"]],
                              right=frozenset({"size"})))
    if report["kept"]:
        blocks.append(Listing("kept", ("why", "blobs"),
                              [(why, str(count)) for why, count in report["kept"].items()],
                              right=frozenset({"blobs"})))
    return blocks


def leaderboard_blocks(board: dict[str, Any]) -> list[Block]:
    """`epreuve leaderboard`: {"challenge", "phase", "entries": [Entry as a dict],
    "stability": None or leaderboard.stability's result}."""
    entries = board["entries"]
    if not entries:
        return [Note("no evaluated submission yet")]
    keys = list(entries[0]["scores"])
    columns = ("rank", "team", "submission", *keys, "failed cases", "runtime / case", "prize",
               "source check")
    rows = [(str(e["rank"]), e["team"],
             str(e["submission_id"]) + (STALE_MARK if e.get("stale") else ""),
             *(f"{_number(e['scores'][k])} (#{e['metric_ranks'][k]})" for k in keys),
             str(e["n_failed"]), _seconds(e["runtime_per_case"]),
             "yes" if e["prize_eligible"] else "no", e.get("source_check", "not checked"))
            for e in entries]
    blocks: list[Block] = [Listing(f"{board['challenge']} / {board['phase']}", columns, rows,
                                   right=frozenset(columns) - {"team"})]
    stale = sorted({e["dataset_version"][:12] for e in entries if e.get("stale")})
    if stale:
        blocks.append(Note(f"{STALE_MARK.strip()} computed on an older dataset version "
                           f"({', '.join(stale)}) than the phase's current one: its scores are "
                           f"those of its own cases. `epreuve rescore {board['challenge']} "
                           f"{board['phase']}` re-scores stored outputs where the inputs did "
                           "not change."))
    firmness = board.get("stability")
    if firmness:
        blocks.append(Note(f"ranking stability over {firmness['resamples']} bootstrap samples "
                           f"of cases: Kendall's tau mean {firmness['kendall_tau_mean']:.3f}, "
                           f"median {firmness['kendall_tau_median']:.3f}"))
        for team, frequencies in firmness["rank_frequencies"].items():
            shares = ", ".join(f"#{r}: {f:.0%}" for r, f in sorted(frequencies.items()))
            blocks.append(Note(f"  {team}: {shares}"))
    return blocks


def check_blocks(report: dict[str, Any]) -> list[Block]:
    """`epreuve check`: the verdict, the message, the run, its log tail and each sample
    case (a dry run on public sample cases: every case may be shown)."""
    verdict = "would pass" if report["ok"] else f"would fail: {report.get('reason')}"
    blocks: list[Block] = [
        Note(f"{report['image']} on {report['challenge']}/{report['phase']}: {verdict}",
             "green" if report["ok"] else "red"),
        Note(report.get("message") or "")]
    run = report.get("run")
    if run:
        blocks.append(Note(f"wall {run['wall_seconds'] or 0:.2f} s, CPU "
                           f"{run['cpu_seconds'] or 0:.2f} s, peak memory "
                           f"{human_bytes(run['peak_memory_bytes'])}"))
        if run.get("log_tail"):
            blocks.append(Log("log (tail):", run["log_tail"][-1500:]))
    cases = [{"case_id": case_id, **case} for case_id, case in report["cases"].items()]
    if cases:
        blocks.append(cases_listing("sample cases", cases))
    return blocks


def run_result_blocks(result: dict[str, Any]) -> list[Block]:
    """`epreuve sandbox run`: RunResult.to_dict()."""
    title = result["status"] + (f": {result['reason']}" if result.get("reason") else "")
    wall, cpu = result.get("wall_seconds"), result.get("cpu_seconds")
    rows = [
        ("exit code", _number(result.get("exit_code"))),
        ("wall time", "-" if wall is None else f"{wall:.3f} s"),
        ("CPU time", "-" if cpu is None else f"{cpu:.3f} s"),
        ("peak memory", human_bytes(result.get("peak_memory_bytes"))),
        ("peak processes", _number(result.get("peak_pids"))),
        ("output", f"{human_bytes(result.get('output_bytes'))} in "
                   f"{result.get('output_files')} files"),
        ("log", human_bytes(result.get("log_bytes"))
         + (" (truncated)" if result.get("log_truncated") else "")),
        ("ran as", _number(result.get("user"))),
        ("accounting", _number(result.get("accounting"))),
    ]
    blocks: list[Block] = [Listing(title, ("field", "value"), rows, header=False),
                           Note(result.get("message") or "")]
    blocks += [Note(f"not collected: {skipped}", "yellow")
               for skipped in result.get("skipped_outputs") or ()]
    if result.get("log_tail"):
        blocks.append(Log("log (last lines):", "\n".join(result["log_tail"].splitlines()[-20:])))
    return blocks


def verification_blocks(report: dict[str, Any]) -> list[Block]:
    """`epreuve dataset verify`: each file that differs from the seal, or the verdict."""
    changes = [(kind, path) for kind in ("added", "missing", "changed") for path in report[kind]]
    if changes:
        return [Listing("files that differ from the seal", ("change", "path"), changes)]
    return [Note(f"intact: version {report['version']} "
                 f"({'full check' if report['full'] else 'quick check'}, "
                 f"{report['hashed_files']} files hashed)")]


def score_blocks(scores: dict[str, dict[str, float]], title: str) -> list[Block]:
    """`epreuve score`: one row per metric, one column per label."""
    labels = list(scores)
    columns = ("metric", *(f"label {label}" for label in labels))
    rows = [(metric, *(_number(scores[label][metric]) for label in labels))
            for metric in next(iter(scores.values()))]
    return [Listing(title, columns, rows, right=frozenset(columns) - {"metric"})]
