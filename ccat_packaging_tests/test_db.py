"""What the operations database's URL looks like wherever it is shown, and the engine made
from it."""

from __future__ import annotations

import pytest

from ccat_packaging.db import make_engine, redacted

SECRET = "s3cr3t"

# (URL, what its redaction shows): a password in the userinfo (encoded, or holding a raw "@"
# that splits it), in the query under the names drivers take one by, in a passfile's path, or
# in a URL that does not even parse.
FORMS = {
    f"postgresql+psycopg2://ccat:{SECRET}@db.example:5432/ops": (
        "postgresql+psycopg2://ccat:***@db.example:5432/ops"
    ),
    f"postgresql+psycopg2://ccat:{SECRET}%40x%3A@db.example/ops": (
        "postgresql+psycopg2://ccat:***@db.example/ops"
    ),
    f"postgresql+psycopg2://ccat:{SECRET}@pa@ss@db.example/ops": (
        "postgresql+psycopg2://ccat:***@***/ops"
    ),
    f"postgresql+psycopg2://ccat@db.example/ops?password={SECRET}": (
        "postgresql+psycopg2://ccat@db.example/ops?password=***"
    ),
    f"postgresql+psycopg2://ccat@db.example/ops?sslmode=verify-full&sslpassword={SECRET}": (
        "postgresql+psycopg2://ccat@db.example/ops?sslmode=***&sslpassword=***"
    ),
    f"postgresql+psycopg2://ccat@db.example/ops?passfile=/etc/{SECRET}/pgpass": (
        "postgresql+psycopg2://ccat@db.example/ops?passfile=***"
    ),
    f"postgresql+psycopg2:///ops?host=/run/postgresql&user=ccat&password={SECRET}": (
        "postgresql+psycopg2:///ops?host=***&user=***&password=***"
    ),
    f"postgresql+psycopg2://ccat@db.example/ops?password={SECRET}&password={SECRET}2": (
        "postgresql+psycopg2://ccat@db.example/ops?password=***"
    ),
    f"postgresql+psycopg2//ccat:{SECRET}@db.example/ops": "<unparseable URL>",
    f"postgresql+psycopg2://ccat:{SECRET}@db.example:port/ops": "<unparseable URL>",
    "sqlite:////srv/ccat/ops_db.sqlite": "sqlite:////srv/ccat/ops_db.sqlite",
}


@pytest.mark.parametrize("url", FORMS)
def test_a_redacted_url_shows_where_the_database_is_but_no_secret(url: str) -> None:
    assert redacted(url) == FORMS[url]
    assert SECRET not in redacted(url)


def test_no_repr_of_an_engine_shows_a_password_given_in_the_query() -> None:
    engine = make_engine(
        f"postgresql+psycopg2://ccat:{SECRET}@db.example/ops?sslpassword={SECRET}&password={SECRET}"
    )
    try:
        for text in (repr(engine), str(engine.url), repr(engine.url)):
            assert SECRET not in text, text
    finally:
        engine.dispose()
