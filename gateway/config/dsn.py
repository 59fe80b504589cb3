"""``audit.dsn``, a PostgreSQL DSN: checked at load, masked for display, its secrets known
so that no message repeats them, and handed to asyncpg as a URL.

``${ENV}`` is substituted as is, so a password with ``/``, ``#`` or ``?`` moves a URL's
boundaries: ``postgresql://gateway:s3cr/t@db/vg`` reads as host ``gateway`` and port
``s3cr``, and the driver's error (``invalid literal for int() ... 's3cr'``) quoted part
of the password into logs and ``/readyz``. Such a DSN is refused at load, and nothing
here ever puts the DSN or a piece of it into a message.
"""

from __future__ import annotations

import re
import urllib.parse

# RFC 3986 userinfo: unreserved, sub-delims, ":" and %XX; anything else must be encoded.
_USERINFO = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*")
# libpq's key=value form: a value single-quoted (with \' and \\) or a run of non-spaces.
_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|(?:[^\s'\\]|\\.)+)\s*")
# The keywords asyncpg understands in a URL's query (any other becomes a server setting).
_KEYWORDS = ("host", "port", "dbname", "user", "password", "passfile", "sslmode",
             "sslrootcert", "sslcert", "sslkey", "sslcrl", "target_session_attrs",
             "application_name")
ENCODE = ("percent-encode it (a '/' is %2F, '#' %23, '?' %3F, '@' %40, '%' %25) or leave "
          "it out of the DSN and set PGPASSWORD or a passfile (PGPASSFILE, ~/.pgpass)")


def is_url(dsn: str) -> bool:
    return "://" in dsn


def _userinfo(dsn: str) -> str | None:
    """What a URL's author meant as ``user:password``: after ``://`` up to the LAST
    ``@`` (a password with ``/`` or ``#`` has already moved the parser's boundaries)."""
    rest = dsn.split("://", 1)[1]
    return rest.rsplit("@", 1)[0] if "@" in rest else None


def keywords(dsn: str) -> dict[str, str] | None:
    """The pairs of a key=value DSN, unquoted; None when it does not parse."""
    pairs: dict[str, str] = {}
    pos = 0
    while pos < len(dsn):
        match = _PAIR.match(dsn, pos)
        if match is None or match.end() == pos:
            return None
        value = match[2][1:-1] if match[2].startswith("'") else match[2]
        pairs[match[1]] = re.sub(r"\\(.)", r"\1", value)
        pos = match.end()
    return pairs


def problem(dsn: str) -> str | None:
    """Why ``dsn`` cannot be used (a sentence that never quotes it), else None."""
    if not is_url(dsn):
        pairs = keywords(dsn)
        if pairs is None:
            return ("audit.dsn is neither a postgresql:// URL nor key=value pairs (quote a "
                    "value with spaces in single quotes, a ' or \\ in it as \\' and \\\\)")
        if set(pairs) - set(_KEYWORDS):
            # Not named: in "password=a b=c" the unknown key is a piece of the password.
            return (f"audit.dsn has a key that is not one of {', '.join(_KEYWORDS)} (a value "
                    "with spaces goes in single quotes)")
        return None
    scheme = dsn.split("://", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        return "audit.dsn must start with postgresql:// (or be key=value pairs)"
    userinfo = _userinfo(dsn)
    if userinfo is not None and not _USERINFO.fullmatch(userinfo):
        return ("audit.dsn: the user or password in the URL has a character that must be "
                f"percent-encoded: {ENCODE}")
    if "#" in dsn:
        return f"audit.dsn: a '#' ends a URL: if it is part of the password, {ENCODE}"
    try:
        urllib.parse.urlsplit(dsn).port  # noqa: B018 (raises on a port that is no number)
    except ValueError:
        return "audit.dsn: the URL's host or port does not parse (host:port/database)"
    return None


def secrets(dsn: str) -> list[str]:
    """Every form the password may take in a message: as written and decoded."""
    if is_url(dsn):
        found = []
        userinfo = _userinfo(dsn)
        if userinfo is not None and ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
        query = dsn.split("?", 1)[1] if "?" in dsn else ""
        found += [v for k, _, v in (p.partition("=") for p in query.split("&"))
                  if k == "password"]
    else:
        match = re.search(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)
        found = [match[1], match[1].strip("'")] if match else []
        found += [v for k, v in (keywords(dsn) or {}).items() if k == "password"]
    found += [urllib.parse.unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def mask(dsn: str) -> str:
    """``dsn`` with its password masked, even when it does not parse."""
    if not is_url(dsn):
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)
    scheme, rest = dsn.split("://", 1)
    userinfo = _userinfo(dsn)
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{rest.rsplit('@', 1)[1]}"
    for secret in secrets(dsn):
        rest = rest.replace(secret, "***")
    return f"{scheme}://{rest}"


def to_url(dsn: str) -> str:
    """A checked DSN as the URL asyncpg takes (it reads no key=value form)."""
    if is_url(dsn):
        return dsn
    pairs = keywords(dsn) or {}

    def q(key: str, safe: str = "") -> str:
        return urllib.parse.quote(pairs.pop(key, ""), safe=safe)

    user, password = q("user"), q("password")
    auth = f"{user}{':' + password if password else ''}@" if user or password else ""
    host, port, db = q("host", ","), q("port"), q("dbname")
    query = urllib.parse.urlencode(pairs)
    return (f"postgresql://{auth}{host}{':' + port if port else ''}/{db}"
            f"{'?' + query if query else ''}")
