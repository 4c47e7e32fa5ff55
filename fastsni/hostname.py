"""``fastsni-hostname NAME``: print the directory name that serves NAME.

International names are converted to their A-label (IDNA 2008 with UTS #46 mapping),
lowercased, with one trailing dot dropped; the result must then pass the proxies'
hostname rules (fastsni.tls.check_hostname).  A one-label wildcard ``*.example.com``
names the directory ``*.`` + the A-label of the rest (only the whole leftmost label may
be ``*``), which serves every name with exactly one more label in front.
"""

from __future__ import annotations

import sys

import idna

from fastsni.tls import check_hostname

USAGE = """usage: fastsni-hostname NAME
Print the hosts-directory entry that serves NAME, or why NAME is not valid.
NAME may be a one-label wildcard, *.example.com: it serves a.example.com, not
a.b.example.com nor example.com, and an exact entry always wins over it."""
WILDCARD = "*."


def directory_name(name: str) -> str:
    """The hosts-directory entry for ``name``; raises ValueError saying why there is none."""
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    if not name:
        raise ValueError("the name is empty")
    if name.startswith(WILDCARD):
        rest = name[len(WILDCARD) :]
        if "*" in rest:
            raise ValueError("only the leftmost label may be '*'")
        return WILDCARD + directory_name(rest)
    if "*" in name:
        raise ValueError("'*' may only be the whole leftmost label, as in *.example.com")
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"not a valid IDNA hostname: {exc}") from None
    checked = check_hostname(ascii_name.encode("ascii"))
    if checked is None:
        raise ValueError(
            "not a valid hostname: use letters, digits, '-' and '.', labels not starting with '-', "
            "no empty label, at most 253 bytes"
        )
    return checked


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--help"], ["-h"]):
        print(USAGE)
        raise SystemExit(0)
    if len(args) != 1:
        sys.stderr.write(USAGE + "\n")
        raise SystemExit(2)
    try:
        print(directory_name(args[0]))
    except ValueError as exc:
        sys.stderr.write(f"fastsni-hostname: {args[0]!r}: {exc}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
