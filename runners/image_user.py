"""The user an image runs as, decided by number, as runc decides it.

A USER may be a name or a number, with or without a group: `algo`, `1000`,
`algo:staff`, `00`, `+0`. runc resolves it against the image's own /etc/passwd
and /etc/group with Go's `strconv.Atoi` (so `00` and `+0` are uid 0, and a
passwd line whose uid field is not a number is uid 0) and, when no group is
given, takes the primary group from passwd (gid 0 when the user has no passwd
line) and adds every group of /etc/group that lists the user. This module does
the same, so that "never root" is checked on the numbers the kernel would see;
the runner then runs those exact numbers as `uid:gid`, which runc takes as they
are (an explicit group adds no supplementary groups).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runners.base import RunnerError

MAX_ID = 2**31 - 1  # runc's range for a numeric uid or gid
MAX_ACCOUNT_FILE = 1 << 20  # /etc/passwd or /etc/group, read to resolve a user name
GO_INT = re.compile(r"[+-]?[0-9]+")
INT64_MAX = 2**63 - 1


class UserUnresolvable(RunnerError, ValueError):
    """The image's USER names nobody runc could find, or a number out of range."""


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    supplementary: tuple[int, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.uid}:{self.gid}"

    def root_part(self) -> str | None:
        """What about this user is root, or None."""
        if self.uid == 0:
            return "uid 0 (root)"
        if self.gid == 0:
            return "group id 0 (root)"
        if 0 in self.supplementary:
            return "a member of group 0 (root) in /etc/group"
        return None


def go_atoi(text: str) -> int | None:
    """Go's strconv.Atoi: an optional sign and decimal digits (`00`, `+0`), else None.
    Out of range values are clamped as Go does (and returned with their sign)."""
    if not GO_INT.fullmatch(text):
        return None
    value = int(text, 10)
    return max(-INT64_MAX - 1, min(INT64_MAX, value))


def _field_int(text: str) -> int:
    """A numeric field of passwd or group: runc ignores the parse error, so junk is 0."""
    value = go_atoi(text)
    return 0 if value is None else value


def _lines(text: str | None) -> list[list[str]]:
    if text is None:
        return []
    # Lines end at "\n" only, as Go's scanner reads them: splitlines() would also break at
    # \v, \f, \x1c-\x1e, \x85, \u2028, which runc keeps inside a line (and its name).
    return [line.strip().split(":") for line in text.split("\n") if line.strip()]


def parse_passwd(text: str | None) -> list[tuple[str, int, int]]:
    """(name, uid, gid) per line, in file order (runc takes the first match)."""
    entries = []
    for parts in _lines(text):
        parts += [""] * (4 - len(parts))
        entries.append((parts[0], _field_int(parts[2]), _field_int(parts[3])))
    return entries


def parse_group(text: str | None) -> list[tuple[str, int, list[str]]]:
    """(name, gid, members) per line, in file order."""
    entries = []
    for parts in _lines(text):
        parts += [""] * (4 - len(parts))
        members = parts[3].split(",") if parts[3] else []
        entries.append((parts[0], _field_int(parts[2]), members))
    return entries


def resolve_user(user_spec: str, passwd: str | None, group: str | None) -> ResolvedUser:
    """uid, gid and supplementary gids of `user_spec`, by runc's rules (GetExecUser).
    `passwd`/`group` are the image's files, or None where the image has none."""
    user_arg, _, group_arg = user_spec.partition(":")
    group_arg = group_arg.split(":", 1)[0]  # runc reads two fields only
    uid_arg, gid_arg = go_atoi(user_arg), go_atoi(group_arg)
    uid, gid, matched_name = 0, 0, ""
    users = parse_passwd(passwd)
    if user_arg == "":
        match = next((u for u in users if u[1] == 0), None)
    elif uid_arg is not None:
        match = next((u for u in users if u[1] == uid_arg), None)
    else:
        match = next((u for u in users if u[0] == user_arg), None)
    if match is not None:
        matched_name, uid, gid = match
    elif user_arg != "":
        if uid_arg is None:
            raise UserUnresolvable(f"the image's USER {user_arg!r} is not in its /etc/passwd")
        uid = _in_range(uid_arg, "uid")
    supplementary: tuple[int, ...] = ()
    if group_arg != "" or matched_name:
        groups = parse_group(group)
        if group_arg != "":
            if gid_arg is not None:
                found = next((g for g in groups if g[1] == gid_arg), None)
            else:
                found = next((g for g in groups if g[0] == group_arg), None)
            if found is not None:
                gid = found[1]
            elif gid_arg is None:
                raise UserUnresolvable(f"the image's USER group {group_arg!r} is not in its "
                                       "/etc/group")
            else:
                gid = _in_range(gid_arg, "gid")
        else:
            supplementary = tuple(g[1] for g in groups if matched_name in g[2])
    return ResolvedUser(_in_range(uid, "uid"), _in_range(gid, "gid"), supplementary)


def _in_range(value: int, what: str) -> int:
    if value < 0 or value > MAX_ID:
        raise UserUnresolvable(f"the image's {what} {value} is out of range (0 to {MAX_ID})")
    return value


def numeric_pair(user_spec: str) -> tuple[int, int] | None:
    """(uid, gid) when the spec is already two numbers (`1000:1000`), else None."""
    user_arg, sep, group_arg = user_spec.partition(":")
    uid, gid = go_atoi(user_arg), go_atoi(group_arg) if sep else None
    if uid is None or gid is None:
        return None
    return uid, gid
