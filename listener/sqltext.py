"""How the Supabase CLI cuts a migration file into statements, and a comparison of SQL texts
that does not care how they were cut.

The CLI (`supabase db push`) records each applied file in
`supabase_migrations.schema_migrations.statements` as the list of its statements: the file is
cut at every `;` that is not inside a quote, a dollar-quoted body, a comment, parentheses or a
`BEGIN ATOMIC ... END` body; each piece keeps the comments before it, loses its trailing `;`
and surrounding white space, and empty pieces are dropped. `planner migrate` writes its rows
the same way, so the two tools' rows are interchangeable, and compares an applied row with its
file through `normalised()`, which ignores comments, white space and statement-ending
semicolons: a row written by either tool (or by an older `planner migrate`, which stored the
whole file as one element) matches the file it came from, and an edited file does not.

The cutting rules follow the CLI's tokenizer (supabase/cli pkg/parser), quirks included: a `)`
closes every open parenthesis at once, and a backslash outside quotes hides the next character.
"""

from __future__ import annotations

import re

#: What Go's strings.TrimSpace removes (ASCII white space, NEL, NBSP); Python's str.strip()
#: would also remove the ASCII separators \x1c-\x1f, which Go keeps.
_GO_SPACE = " \t\n\r\v\f\x85\xa0"


def _ident_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$"


def _ends_with_begin_atomic(text: str) -> bool:
    """Whether `text` ends with the keywords BEGIN ATOMIC (any case, any white space between),
    each a whole word: the start of a SQL-standard function body, inside which `;` does not
    end the statement."""
    if len(text) < 6 or text[-6:].upper() != "ATOMIC":
        return False
    head = text[:-6]
    if head and _ident_char(head[-1]):
        return False
    head = head.rstrip()
    if len(head) < 5 or head[-5:].upper() != "BEGIN":
        return False
    return len(head) == 5 or not _ident_char(head[-6])


class _Cutter:
    """One pass over a SQL text, cutting it where the CLI does.

    `mode` is what the scanner is inside: "" (plain SQL), "-" (after one dash), "/" (after a
    slash), "block" (a /* */ comment, `depth` deep), "quote" (`delim` is ' or "; `closing`
    after a quote character that may end it or be doubled), "tag" (after a `$` that may open a
    dollar quote), "until" (a dollar quote or line comment, ending at `delim`), "escape" (after
    a backslash). `wrappers` are the open parenthesis / BEGIN ATOMIC bodies, innermost last,
    each with the text that closes it.
    """

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.start = 0  # where the current statement began
        self.end = 0  # one past the character being read
        self.reset(0)

    def reset(self, start: int) -> None:
        self.start = start
        self.mode = ""
        self.delim = ""
        self.depth = 0
        self.closing = False
        self.tag_at = 0
        self.wrappers: list[str] = []

    def tail(self, n: int) -> str:
        """The last `n` characters of the statement so far (fewer at its start)."""
        return self.sql[max(self.start, self.end - n):self.end]

    def step(self, end: int) -> bool:
        """Read the character before `end`; True when the statement ends with it. Inside a
        wrapper `;` never ends it."""
        self.end = end
        ends = self._advance(self.sql[end - 1])
        if not self.wrappers:
            return ends
        # A wrapper closes when the text so far ends with its closer outside any quote or
        # comment; the one around it may close on the same text (the CLI's `)` closes every
        # open parenthesis at once).
        while self.mode == "" and self.wrappers:
            closer = self.wrappers[-1]
            if self.tail(len(closer)).upper() != closer:
                break
            self.wrappers.pop()
        return False

    def _plain(self, ch: str) -> bool:
        """Plain SQL; True when `ch` ends the statement."""
        if ch == "$":
            self.mode, self.tag_at = "tag", self.end - 1
        elif ch in "'\"":
            self.mode, self.delim, self.closing = "quote", ch, False
        elif ch == "-":
            self.mode = "-"
        elif ch == "/":
            self.mode, self.depth = "/", 0
        elif ch == "\\":
            self.mode = "escape"
        elif ch == ";":
            return True
        elif ch == "(":
            self.wrappers.append(")")
        elif ch in "cC" and _ends_with_begin_atomic(self.tail(64)):
            self.wrappers.append("END")
        return False

    def _advance(self, ch: str) -> bool:
        mode = self.mode
        if mode == "":
            return self._plain(ch)
        if mode == "-":
            if ch == "-":
                self.mode, self.delim = "until", "\n"
                return False
            self.mode = ""
            return self._plain(ch)
        if mode in ("/", "block"):
            window = self.tail(2)
            if window == "/*":
                self.mode, self.depth = "block", self.depth + 1
                return False
            if self.depth == 0:
                self.mode = ""
                return self._plain(ch)
            if window == "*/":
                self.depth -= 1
                if self.depth == 0:
                    self.mode = ""
            return False
        if mode == "quote":
            if self.closing:
                if ch == self.delim:
                    self.closing = False
                    return False
                self.mode = ""
                return self._plain(ch)
            if ch == self.delim:
                self.closing = True
            return False
        if mode == "until":
            if self.tail(len(self.delim)) == self.delim:
                self.mode = ""
            return False
        if mode == "tag":
            if ch == "$":
                self.mode, self.delim = "until", self.sql[self.tag_at:self.end]
                return False
            if ch.isalnum() or ch == "_":
                return False
            self.mode = ""
            return self._plain(ch)
        # escape: the character after a backslash is skipped.
        self.mode = ""
        return False


def split_statements(sql: str) -> list[str]:
    """The statements the Supabase CLI records for a migration file with this text."""
    pieces: list[str] = []
    cutter = _Cutter(sql)
    for end in range(1, len(sql) + 1):
        if cutter.step(end):
            pieces.append(sql[cutter.start:end])
            cutter.reset(end)
    pieces.append(sql[cutter.start:])
    trimmed = (piece.rstrip(";").strip(_GO_SPACE) for piece in pieces)
    return [piece for piece in trimmed if piece]


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def _skip_block_comment(sql: str, i: int) -> int:
    """The index after the (nested) block comment opening at `i`, or the end of the text."""
    depth = 0
    while i < len(sql):
        if sql.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return i


def _skip_quoted(sql: str, i: int) -> int:
    """The index after the '...' or "..." literal opening at `i` (doubled quotes stay inside)."""
    quote = sql[i]
    i += 1
    while i < len(sql):
        if sql[i] == quote:
            if sql.startswith(quote * 2, i):
                i += 2
                continue
            return i + 1
        i += 1
    return i


def normalised(sql: str) -> str:
    """`sql` with comments, statement-ending semicolons and runs of white space outside quoted
    text each made one space, trimmed: the same for a file, the CLI's statements of it joined,
    and the file stored whole. Quoted text (literals, identifiers, dollar-quoted bodies) is
    kept exactly, so an edit inside a function body still counts as a change."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            out.append(" ")
        elif sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
            out.append(" ")
        elif ch in "'\"":
            j = _skip_quoted(sql, i)
            out.append(sql[i:j])
            i = j
        elif ch == "$" and (tag := _DOLLAR_TAG.match(sql, i)) is not None and (
            i == 0 or not _ident_char(sql[i - 1])
        ):
            close = sql.find(tag.group(), tag.end())
            j = n if close < 0 else close + len(tag.group())
            out.append(sql[i:j])
            i = j
        elif ch == ";" or ch.isspace():
            out.append(" ")
            i += 1
        else:
            out.append(ch)
            i += 1
    return re.sub(" +", " ", "".join(out)).strip()


def statements_match(statements: list[str], sql: str) -> bool:
    """Whether a `statements` array recorded for a migration (the CLI's split statements, or
    the whole file as one element) was recorded from a file with the text `sql`."""
    # A newline before each `;` ends a line comment the previous piece may finish with.
    return normalised("\n;\n".join(statements)) == normalised(sql)
