#!/usr/bin/env python3
"""Generate tests/corpus/mask/labelled.tsv: synthetic sensitive values of every detector kind and
hard look-alikes labelled `none`, for the masking engine's precision/recall test.

Deterministic (fixed seed); run from anywhere:  python3 tests/corpus/mask/generate.py

Columns: expected_kind, column_context (`-`: none), value, pii.
  - value: backslash escapes `\\n`, `\\t`, `\\\\` (PEM blocks span lines).
  - pii: the sensitive part of value, when it is not the whole value (URL passwords, values in a
    sentence); empty: the whole value. For `none` rows it is empty.
Every value is synthetic: random digits with valid check digits, example domains, fictional
(555-01xx, Ofcom drama) phone ranges. Labels say what a careful human reviewer would say the value
is, whatever the engine does with it.
"""

import base64
import hashlib
import json
import os
import random
import string

R = random.Random(20261130)
ROWS = []


def add(kind, ctx, value, pii=""):
    ROWS.append((kind, ctx or "-", value, pii))


def rbytes(n):
    return bytes(R.randrange(256) for _ in range(n))


def digits(n):
    return "".join(R.choice(string.digits) for _ in range(n))


def alnum(n, alphabet=string.ascii_letters + string.digits):
    return "".join(R.choice(alphabet) for _ in range(n))


def sentence(kind, ctx, value, templates):
    add(kind, ctx, R.choice(templates).format(value), value)


def alone_or_in(kind, value, in_sentence, contexts, sentence_ctx, templates):
    """A value alone under one of `contexts`, or (every so often) inside a sentence."""
    if in_sentence:
        sentence(kind, sentence_ctx, value, templates)
    else:
        add(kind, R.choice(contexts), value)


# --- cards ------------------------------------------------------------------------------------


def luhn_complete(prefix, length):
    body = prefix + digits(length - len(prefix) - 1)
    total = 0
    for i, d in enumerate(reversed(body)):
        x = int(d)
        if i % 2 == 0:
            x *= 2
            if x > 9:
                x -= 9
        total += x
    return body + str((10 - total % 10) % 10)


BRANDS = {
    "visa": (lambda: "4", [16, 16, 16, 13, 19]),
    "mastercard": (lambda: R.choice([str(R.randint(51, 55)), str(R.randint(2221, 2720))]), [16]),
    "amex": (lambda: R.choice(["34", "37"]), [15]),
    "discover": (lambda: R.choice(["6011", "65", str(R.randint(644, 649))]), [16, 19]),
    "jcb": (lambda: str(R.randint(3528, 3589)), [16]),
    "diners": (lambda: R.choice([str(R.randint(300, 305)), "36", "38", "39"]), [14]),
    "unionpay": (lambda: "62" + str(R.randint(0, 9)), [16, 17, 18, 19]),
}


def group(number, sizes, sep):
    out, i = [], 0
    for s in sizes:
        out.append(number[i : i + s])
        i += s
    if i < len(number):
        out.append(number[i:])
    return sep.join(p for p in out if p)


def card_format(number):
    style = R.choice(["compact", "space", "dash"])
    if style == "compact":
        return number
    sep = " " if style == "space" else "-"
    if len(number) == 15:
        return group(number, [4, 6, 5], sep)
    if len(number) == 14:
        return group(number, [4, 6, 4], sep)
    return group(number, [4, 4, 4, 4], sep)


CARD_SENTENCES = ["paid with {} yesterday", "card: {}", "Customer card {}, exp 12/27", "refund to {} please"]
for brand, (prefix, lengths) in BRANDS.items():
    for i in range(9):
        number = card_format(luhn_complete(prefix(), R.choice(lengths)))
        ctx = R.choice(["card_number", "pan", "payment_card", "notes", "-"])
        if i % 3 == 2:
            sentence("card", "notes", number, CARD_SENTENCES)
        else:
            add("card", ctx, number)

# Look-alikes: Luhn-valid numbers without an issuer prefix or with the wrong length for it.
for _ in range(14):
    prefix = R.choice(["1", "7", "8", "9", "0"])
    add("none", R.choice(["order_id", "tracking_no", "-"]), luhn_complete(prefix, R.choice([12, 14, 16, 18])))
for _ in range(6):
    # Visa prefix but 15 or 17 digits; Amex prefix but 16.
    p, n = R.choice([("4", 15), ("4", 17), ("34", 16), ("37", 14)])
    add("none", "reference", luhn_complete(p, n))
for _ in range(8):
    # Brand prefix and length, failing Luhn.
    good = luhn_complete("4", 16)
    bad = good[:-1] + str((int(good[-1]) + R.randint(1, 9)) % 10)
    add("none", R.choice(["-", "notes"]), bad)
for _ in range(12):
    # Millisecond timestamps (13 digits starting 1).
    add("none", R.choice(["created_ms", "ts", "-"]), str(R.randint(1_500_000_000_000, 1_800_000_000_000)))

# --- SSN --------------------------------------------------------------------------------------


def ssn():
    while True:
        area = R.randint(1, 899)
        if area != 666:
            break
    return f"{area:03d}-{R.randint(1, 99):02d}-{R.randint(1, 9999):04d}"


for i in range(30):
    alone_or_in("ssn", ssn(), i % 4 == 3, ["ssn", "social_security_number", "-", "employee_tin"], "notes",
                ["SSN {} on file", "applicant ssn: {}", "tax id {}."])
for _ in range(10):
    add("ssn", R.choice(["ssn", "social_security_no"]), ssn().replace("-", ""))
for bad in ["000-12-3456", "666-45-1234", "900-12-3456", "987-65-4320", "123-00-4567", "123-45-0000",
            "000-00-0000", "999-99-9999", "666-66-6666", "078-05-0000"]:
    add("none", R.choice(["ssn", "-"]) if bad[0] != "9" else "-", bad)
for _ in range(6):
    # Nine bare digits with no hint: a zip+4 without dash, an account number.
    add("none", R.choice(["zip4", "account_no", "-"]), digits(9))

# --- IBAN -------------------------------------------------------------------------------------

IBAN_FORMATS = {
    # country: BBAN pattern (n: digit, a: upper letter, c: either)
    "DE": "nnnnnnnnnnnnnnnnnn", "FR": "nnnnnnnnnnnnnnnnnnnnnnn", "GB": "aaaannnnnnnnnnnnnn",
    "NL": "aaaannnnnnnnnn", "ES": "nnnnnnnnnnnnnnnnnnnn", "IT": "annnnnnnnnnnnnnnnnnnnnn",
    "BE": "nnnnnnnnnnnn", "CH": "nnnnnnnnnnnnnnnnn", "AT": "nnnnnnnnnnnnnnnn",
    "PL": "nnnnnnnnnnnnnnnnnnnnnnnn", "PT": "nnnnnnnnnnnnnnnnnnnnn", "SE": "nnnnnnnnnnnnnnnnnnnn",
    "NO": "nnnnnnnnnnn", "DK": "nnnnnnnnnnnnnn", "FI": "nnnnnnnnnnnnnn", "IE": "aaaannnnnnnnnnnnnn",
    "LU": "nnnccccccccccccc", "CZ": "nnnnnnnnnnnnnnnnnnnn", "HU": "nnnnnnnnnnnnnnnnnnnnnnnn",
    "RO": "aaaacccccccccccccccc", "GR": "nnnnnnncccccccccccccccc", "SA": "nnccccccccccccccccnn",
    "AE": "nnnnnnnnnnnnnnnnnnn", "TR": "nnnnnncccccccccccccccc", "SK": "nnnnnnnnnnnnnnnnnnnn",
    "SI": "nnnnnnnnnnnnnnn", "HR": "nnnnnnnnnnnnnnnnn", "LT": "nnnnnnnnnnnnnnnn", "EE": "nnnnnnnnnnnnnnnn",
    "MT": "aaaannnnncccccccccccccccccc", "CY": "nnnnnnnncccccccccccccccc",
}


def bban(pattern):
    pick = {"n": string.digits, "a": string.ascii_uppercase, "c": string.ascii_uppercase + string.digits}
    return "".join(R.choice(pick[p]) for p in pattern)


def iban_check(country, body):
    rearranged = body + country + "00"
    num = "".join(str(int(ch, 36)) for ch in rearranged)
    return f"{98 - int(num) % 97:02d}"


def iban(country):
    body = bban(IBAN_FORMATS[country])
    return country + iban_check(country, body) + body


def spaced(s):
    return " ".join(s[i : i + 4] for i in range(0, len(s), 4))


for i, country in enumerate(list(IBAN_FORMATS) * 2):
    value = iban(country)
    if i % 2:
        value = spaced(value)
    alone_or_in("iban", value, i % 5 == 4, ["iban", "bank_account", "-"], "notes",
                ["transfer to {} today", "IBAN: {}", "pay {} (ref 123)"])
for _ in range(12):
    good = iban(R.choice(list(IBAN_FORMATS)))
    check = int(good[2:4])
    bad = good[:2] + f"{(check + R.randint(1, 90)) % 100:02d}" + good[4:]
    add("none", R.choice(["iban", "-"]), bad)

# --- phones -----------------------------------------------------------------------------------


def nanp():
    return str(R.randint(2, 9)) + digits(2), "555", f"01{digits(2)}"


NANP_FORMATS = ["({}) {}-{}", "{}-{}-{}", "{}.{}.{}", "1-{}-{}-{}", "{} {} {}", "1 ({}) {}-{}"]
for i in range(12):
    value = NANP_FORMATS[i % len(NANP_FORMATS)].format(*nanp())
    add("phone", R.choice(["-", "contact", "notes"]), value)
for _ in range(6):
    a, x, n = nanp()
    sentence("phone", "notes", f"({a}) {x}-{n}", ["call me at {} after 5", "phone: {}", "tel {}"])
INTL = [
    lambda: "+1 " + " ".join(nanp()),
    lambda: "+1" + "".join(nanp()),
    lambda: "+44 20 7946 0" + digits(3),
    lambda: "+44 7700 900" + digits(3),
    lambda: "+33 6 " + " ".join(digits(2) for _ in range(4)),
    lambda: "+49 30 " + digits(8),
    lambda: "+91 98" + digits(3) + " " + digits(5),
    lambda: "+61 2 " + digits(4) + " " + digits(4),
    lambda: "+81 3-" + digits(4) + "-" + digits(4),
    lambda: "+34 6" + digits(2) + " " + digits(3) + " " + digits(3),
    lambda: "+55 11 9" + digits(4) + "-" + digits(4),
    lambda: "+4915" + digits(9),
]
for i in range(24):
    value = INTL[i % len(INTL)]()
    alone_or_in("phone", value, i % 4 == 3, ["-", "phone", "contact_number"], "notes",
                ["reach her on {} (mobile)", "whatsapp {}", "emergency contact {}"])
NATIONAL = [
    lambda: "020 7946 0" + digits(3),
    lambda: "07700 900" + digits(3),
    lambda: "06 " + " ".join(digits(2) for _ in range(4)),
    lambda: "030 " + digits(8),
    lambda: "".join(nanp()),
    lambda: "0" + digits(2) + "-" + digits(4) + "-" + digits(4),
]
for i in range(18):
    add("phone", R.choice(["phone", "mobile", "telephone", "fax_number", "contact_phone"]), NATIONAL[i % len(NATIONAL)]())
# Phone-like identifiers without any phone context.
for _ in range(14):
    value = R.choice([
        lambda: "".join(nanp()),                       # 10 bare digits: an id
        lambda: "ORD-" + digits(4) + "-" + digits(6),
        lambda: digits(3) + "-" + digits(7),
        lambda: "20" + digits(2) + "-" + f"{R.randint(1, 12):02d}-{R.randint(1, 28):02d}",
        lambda: f"{R.randint(1, 12):02d}/{R.randint(1, 28):02d}/20{digits(2)}",
        lambda: digits(8),
    ])()
    add("none", R.choice(["order_id", "invoice", "customer_id", "-", "created"]), value)

# ISBNs.
for _ in range(8):
    body = "978" + digits(9)
    check = (10 - sum((1 if i % 2 == 0 else 3) * int(d) for i, d in enumerate(body)) % 10) % 10
    isbn = body + str(check)
    add("none", R.choice(["isbn", "-"]), R.choice([isbn, f"{isbn[:3]}-{isbn[3]}-{isbn[4:7]}-{isbn[7:12]}-{isbn[12]}"]))

# --- emails -----------------------------------------------------------------------------------

WORDLIST = ["correct", "horse", "battery", "staple", "orbit", "maple", "quartz", "lantern", "river", "pixel"]
FIRST = ["jane", "john", "maria", "wei", "olu", "anna", "li", "sam", "priya", "lukas", "noah", "emma"]
LAST = ["doe", "smith", "garcia", "chen", "okafor", "kowalski", "nguyen", "muller", "patel", "rossi"]
DOMAINS = ["example.com", "example.org", "mail.example.net", "corp.example.co.uk", "example.io",
           "students.example.edu", "example.de"]


def email():
    f, l = R.choice(FIRST), R.choice(LAST)
    local = R.choice([f"{f}.{l}", f"{f}{l}{R.randint(1, 99)}", f"{f[0]}{l}", f"{f}+{R.choice(['news', 'shop'])}",
                      f"{f}_{l}", f"{l}.{f}", f"{f.upper()}.{l.capitalize()}"])
    return f"{local}@{R.choice(DOMAINS)}"


for i in range(45):
    alone_or_in("email", email(), i % 3 == 2, ["email", "user_email", "contact", "-", "EmailAddress"], "notes",
                ["Contact {} for access", "sent to <{}>", "from: {}, re: invoice", "mailto:{}", "cc {}."])
for v in ["user@localhost", "admin@server", "@jane_doe", "jane@", "a@b", "name at example dot com",
          "foo@bar@baz", "@@", "x@-example.com", "release@1.2.3", "node@18.17.0", "pkg@^4.2.0"]:
    add("none", R.choice(["handle", "-", "note"]), v)

# --- IP addresses -----------------------------------------------------------------------------

for i in range(25):
    ip = R.choice([
        lambda: f"10.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}",
        lambda: f"192.168.{R.randint(0, 255)}.{R.randint(1, 254)}",
        lambda: f"203.0.113.{R.randint(1, 254)}",
        lambda: f"198.51.100.{R.randint(1, 254)}",
        lambda: f"{R.randint(11, 223)}.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}",
    ])()
    alone_or_in("ipv4", ip, i % 3 == 2, ["client_ip", "ip_address", "-", "remote_addr"], "log",
                ["connection from {} port 51234", "client={}", "GET / from {}:443", "blocked {}."])


def ipv6():
    groups = [f"{R.randint(0, 0xFFFF):x}" for _ in range(8)]
    style = R.choice(["full", "compress", "doc", "link", "mapped"])
    if style == "full":
        return ":".join(groups)
    if style == "compress":
        return ":".join(groups[:3]) + "::" + ":".join(groups[6:])
    if style == "doc":
        return f"2001:db8::{R.randint(1, 0xFFFF):x}"
    if style == "link":
        return f"fe80::{':'.join(groups[4:])}"
    return f"::ffff:192.0.2.{R.randint(1, 254)}"


for i in range(20):
    alone_or_in("ipv6", ipv6(), i % 4 == 3, ["client_ip", "-", "ipv6_address"], "log",
                ["peer [{}]:8443 closed", "from {} via eth0", "addr={}"])
add("ipv6", "-", "::1")
for v in ["10.2.3.4.5", "v2.31.0", "4.19.0-21-amd64", "192.168.1", "256.1.1.1", "1.2.3.4.5.6", "3.14159",
          "01.02.2024", "v1.2.3.4-beta", "12:30:45", "2024-01-15T10:30:00Z", "00:1a:2b:3c:4d:5e",
          "std::io::Result", "a::b", "Foo::bar::baz", "10:30", "1.0.0", "ver 999.999.999.999",
          "host:port", "13:45:07.123", "5.15.0-1051-azure", "2.6.32.754.el6"]:
    add("none", R.choice(["version", "-", "kernel", "time"]), v)

# --- tokens -----------------------------------------------------------------------------------


def b64(data):
    """Standard base64 without padding, as PHC strings (argon2, scrypt) use."""
    return base64.b64encode(data).rstrip(b"=").decode()


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


for i in range(16):
    alg = R.choice(["HS256", "RS256", "ES256", "HS512"])
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps({"sub": str(R.randint(1, 10**6)), "iat": R.randint(1_600_000_000, 1_800_000_000),
                                 "name": R.choice(FIRST)}, separators=(",", ":")).encode())
    sig = b64url(rbytes(32 if alg[0] == "H" else 64))
    jwt = f"{header}.{payload}.{sig}"
    alone_or_in("jwt", jwt, i % 3 == 2, ["access_token", "-", "session"], "authorization",
                ["Bearer {}", "token={}&x=1"])
# Not JWTs: base64 JSON with no dots, header without alg, dotted words.
for _ in range(4):
    blob = b64url(json.dumps({"id": R.randint(1, 999), "k": alnum(6)}).encode())
    add("none", "-", blob)
for _ in range(3):
    h = b64url(b'{"typ":"JWT"}')
    add("none", "-", f"{h}.{b64url(b'{}')}.{alnum(10)}")
add("none", "-", "eyJ.not.a.token")

AWS32 = string.ascii_uppercase + "234567"
for i in range(16):
    key = R.choice(["AKIA", "ASIA"]) + alnum(16, AWS32)
    alone_or_in("aws_access_key", key, i % 4 == 3, ["access_key_id", "-"], "config",
                ["aws_access_key_id = {}", "export AWS_ACCESS_KEY_ID={}"])
for v in ["AKIA1234", "AKIAIOSFODNN7EXAMPLE1", "ASIAN_FOOD_CATEGORY_ID", "AKIAIOSFODNN7exampl"]:
    add("none", "-", v)

B64 = string.ascii_letters + string.digits + "+/"


def aws_secret():
    while True:
        s = alnum(40, B64)
        if any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s):
            return s


for i in range(16):
    s = aws_secret()
    if i % 2:
        sentence("aws_secret_key", R.choice(["config", "-"]), s,
                 ["aws_secret_access_key = {}", "AWS_SECRET_ACCESS_KEY={}", 'secret: "{}"'])
    else:
        add("aws_secret_key", R.choice(["aws_secret_access_key", "secret_key", "secret"]), s)
# 40-character blobs where nothing says secret: hashes and checksums.
for _ in range(12):
    add("none", R.choice(["commit", "sha1", "checksum", "-"]), hashlib.sha1(rbytes(20)).hexdigest())
for _ in range(10):
    add("none", R.choice(["digest", "sha256", "-"]), hashlib.sha256(rbytes(20)).hexdigest())
for _ in range(8):
    add("none", R.choice(["payload", "blob", "-"]), base64.b64encode(rbytes(R.choice([16, 24, 33, 48]))).decode())

GH = [("ghp_", 36), ("gho_", 36), ("ghu_", 36), ("ghs_", 36), ("ghr_", 36)]
for i in range(15):
    if i % 5 == 4:
        tok = "github_pat_" + alnum(22) + "_" + alnum(59)
    else:
        p, n = GH[i % 5]
        tok = p + alnum(n)
    alone_or_in("github_token", tok, i % 3 == 2, ["token", "-", "github_token"], "notes",
                ["GITHUB_TOKEN={}", "use {} for CI", "token {} leaked"])
for i in range(10):
    tok = "glpat-" + alnum(20, string.ascii_letters + string.digits + "_-")
    add("gitlab_token", R.choice(["token", "-"]), tok if i % 3 else f"PRIVATE-TOKEN: {tok}", "" if i % 3 else tok)
for i in range(12):
    tok = "xox" + R.choice("abposr") + "-" + digits(11) + "-" + digits(13) + "-" + alnum(24)
    add("slack_token", R.choice(["slack_token", "-", "notes"]), tok)
for i in range(12):
    tok = R.choice(["sk_live_", "rk_live_", "sk_test_", "rk_test_"]) + alnum(R.choice([24, 34, 99]))
    add("stripe_key", R.choice(["stripe_key", "-", "api_key"]), tok)
for v in ["ghp_short", "ghp_", "glpat-abc", "xoxb-", "sk_live_", "pk_live_" + alnum(24), "task_live_update",
          "the ghost_protocol", "disk_test_results", "xoxo-hugs"]:
    add("none", R.choice(["-", "notes"]), v)


def pem(label):
    body = "\n".join(base64.b64encode(rbytes(48)).decode() for _ in range(R.randint(3, 8)))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----"


for label in ["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "ENCRYPTED PRIVATE KEY",
              "DSA PRIVATE KEY", "RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"]:
    add("private_key", R.choice(["private_key", "-", "ssh_key"]), pem(label))
for label in ["CERTIFICATE", "PUBLIC KEY", "RSA PUBLIC KEY", "CERTIFICATE REQUEST", "X509 CRL"]:
    add("none", "-", pem(label))

# --- URL credentials --------------------------------------------------------------------------

for i in range(18):
    user = R.choice(["app", "admin", "postgres", "deploy", "", "svc_reader"])
    pw = alnum(R.randint(8, 20)) + R.choice(["", "!", "%40x", "~"])
    scheme, host = R.choice([("postgres", "db.example.com:5432/app"), ("postgresql", "db-prod.example.com/prod"),
                             ("mysql", "mysql.internal:3306/shop"), ("redis", "cache.example.net:6379/0"),
                             ("https", "git.example.com/org/repo.git"), ("amqp", "mq.example.org:5672/"),
                             ("mongodb+srv", "cluster0.example.net/db?retryWrites=true")])
    url = f"{scheme}://{user}:{pw}@{host}"
    value = url if i % 3 else f"DATABASE_URL={url}"
    add("url_password", R.choice(["dsn", "-", "connection_string"]), value, pw)
for v in ["https://example.com/path?x=1", "https://user@example.com/", "http://example.com:8080/a:b@c",
          "ssh://git@example.com/repo.git", "s3://bucket/key", "https://example.com/@handle",
          "file:///etc/hosts", "https://example.com:8443/a/b"]:
    add("none", R.choice(["url", "-"]), v)

# --- password hashes --------------------------------------------------------------------------

BCRYPT = string.ascii_letters + string.digits + "./"
for i in range(18):
    kind = i % 3
    if kind == 0:
        h = f"${R.choice(['2a', '2b', '2y'])}${R.choice([10, 11, 12, 14]):02d}$" + alnum(53, BCRYPT)
    elif kind == 1:
        h = (f"$argon2{R.choice(['id', 'i', 'd'])}$v=19$m={R.choice([19456, 65536])},t={R.randint(2, 4)},p=1$"
             + b64(rbytes(16)) + "$" + b64(rbytes(32)))
    else:
        h = R.choice([
            "$7$C6..../...." + alnum(16, BCRYPT) + "$" + alnum(43, BCRYPT),
            "$scrypt$ln=16,r=8,p=1$" + b64(rbytes(16)) + "$" + b64(rbytes(32)),
        ])
    add("password_hash", R.choice(["password_hash", "password", "-", "pw"]), h)
for v in ["$2.50", "$2b", "$19.99 per month", "costs $7 or $8", "$argon2", "$5$rounds", "$PATH:$HOME/bin",
          "${HOME}/.config", "$1,234,567.89", "price: $2a dozen"]:
    add("none", R.choice(["price", "-", "notes"]), v)

# --- secrets by name (no known format; the column or key says what it is) --------------------

SECRET_COLUMNS = ["password", "db_password", "client_secret", "api_key", "auth_token", "refresh_token",
                  "webhook_secret", "PASSWORD", "apiKey", "smtp_passwd", "private_key_passphrase"]
PUNCT = "!#%&*-_=.?"
for i in range(22):
    value = R.choice([
        lambda: alnum(R.randint(8, 16), string.ascii_letters + string.digits + PUNCT),
        lambda: "".join(R.choice(string.hexdigits.lower()) for _ in range(32)),
        lambda: "-".join(R.choice(WORDLIST) for _ in range(4)),
        lambda: b64url(rbytes(24)),
        lambda: R.choice(FIRST).capitalize() + str(R.randint(1900, 2024)) + R.choice(PUNCT),
    ])()
    add("secret", SECRET_COLUMNS[i % len(SECRET_COLUMNS)], value)
for ctx, value in [("password_policy", "min 12 chars, 1 digit"), ("token_type", "Bearer"),
                   ("secret_question", "Name of your first pet?"), ("password_set", "true"),
                   ("token_count", "1234567"), ("password_length", "16"), ("token_expires_at", "2025-01-01T00:00:00Z"),
                   ("password_changed", "2024-06-30"), ("api_key_scope", "read write"), ("auth_token", "none"),
                   ("secret_santa", "Alice"), ("refresh_token", ""), ("password", "********"),
                   ("client_secret_rotated_at", "2025-03-01 12:00:00+00")]:
    add("none", ctx, value)

# --- ordinary values --------------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over lazy dog order shipped pending review customer account "
         "invoice paid status active disabled admin report monthly total amount region north").split()
for _ in range(40):
    add("none", R.choice(["description", "notes", "status", "-", "title"]), " ".join(R.choice(WORDS) for _ in range(R.randint(1, 9))).capitalize())
for _ in range(15):
    add("none", R.choice(["id", "-"]), "%08x-%04x-%04x-%04x-%012x" % (R.getrandbits(32), R.getrandbits(16), R.getrandbits(16), R.getrandbits(16), R.getrandbits(48)))
for _ in range(15):
    add("none", R.choice(["amount", "qty", "total", "-"]), R.choice([str(R.randint(0, 99999)), f"{R.uniform(0, 1e6):.2f}", f"-{R.randint(1, 500)}"]))
for _ in range(10):
    add("none", R.choice(["created_at", "-"]), f"20{digits(2)}-{R.randint(1, 12):02d}-{R.randint(1, 28):02d} {R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}+00")
for v in ["Jane Doe", "Acme Corp", "true", "false", "NULL", "N/A", "Room 101", "Building 7, Floor 3",
          "SKU-88213-B", "INV-2024-000981", "v10.4.0", "rustc 1.95.0 (59807616e 2026-04-14)",
          "Order #12345 shipped", "3 items, total 42.50 EUR", "lat 52.5200, lon 13.4050",
          "SELECT * FROM users WHERE id = 42", "https://example.com/docs/getting-started",
          "internationalization-and-localization", "key: value", "Ratio 16:9",
          "-----", "=== RUN TestMask", "Zip 94103-1234", "PO Box 4567"]:
    add("none", R.choice(["notes", "-"]), v)


def esc(s):
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "labelled.tsv"), "w") as out:
    out.write("# generated by generate.py; columns: expected_kind, column_context, value, pii (see there)\n")
    for kind, ctx, value, pii in ROWS:
        out.write(f"{kind}\t{ctx}\t{esc(value)}\t{esc(pii)}\n")
print(f"{len(ROWS)} rows")
