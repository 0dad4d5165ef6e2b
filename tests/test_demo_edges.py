"""What a new user meets first, at its edges: `gateway init` / `gateway demo` on a home left by a
key generation cut short, with a damaged demo.json, on a home path SoftHSM cannot use or that is
a file, a broken audit trail told in words, two demos on one home in one second, a second home on
one PostgreSQL database, and `scripts/dev.sh` with a venv left without pip.

The command-line tests have a home of their own each (a subprocess per command: SoftHSM reads its
configuration once per process); the in-process one uses the session's home and token."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import Settings, load_settings
from gateway.signing.hsm import Hsm

ROOT = Path(__file__).resolve().parents[1]
_ENV_OVERRIDES = ("GATEWAY_HOME", "GATEWAY_DATABASE_URL", "GATEWAY_PKCS11_LIB", "GATEWAY_HSM_PIN")


def _gateway(home: Path | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in _ENV_OVERRIDES}
    where = ["--home", str(home)] if home is not None else []
    return subprocess.run([sys.executable, "-m", "gateway", *where, *args],
                          capture_output=True, text=True, timeout=300, env={**full, **env})


def _init(home: Path) -> dict:
    proc = _gateway(home, "init")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((home / "demo.json").read_text())


def _steps(stdout: str) -> list[str]:
    return re.findall(r"^\s*\d+\. \[(ok|FAILED)\] ", stdout, re.MULTILINE)


# A key generation cut short, as SoftHSM leaves it when the process dies inside
# C_GenerateKeyPair: the public key under its label, no private key (nor certificate) under it,
# and a private key object with neither label nor key material.
_CUT_SHORT = """
import sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass

module, token_label, pin = sys.argv[1:4]
with pkcs11.lib(module).get_token(token_label=token_label).open(user_pin=pin, rw=True) as s:
    for label in ("demo-supplier", "audit"):
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.CERTIFICATE):
            for obj in list(s.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})):
                obj.destroy()
        assert list(s.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}))
    s.create_object({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA,
                     Attribute.TOKEN: True, Attribute.MODULUS: b"", Attribute.PRIVATE_EXPONENT: b""})
"""


def test_init_and_demo_recover_from_a_key_generation_cut_short(tmp_path: Path) -> None:
    """`init` killed while the HSM generated a key: the public half stayed under the label. Every
    later `init` failed (hsm_error ... NoSuchKey) for the demo key, or passed for the audit key
    and left every checkpoint failing; the empty private key made /readyz answer 503."""
    home = tmp_path / "home"
    _init(home)
    settings = load_settings(home)
    proc = subprocess.run([sys.executable, "-c", _CUT_SHORT, settings.hsm.module,
                           settings.hsm.token_label, settings.hsm.user_pin],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SOFTHSM2_CONF": str(settings.softhsm_conf)})
    assert proc.returncode == 0, proc.stderr[-2000:]

    proc = _gateway(home, "init")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = _gateway(home, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    labels = [k["label"] for k in json.loads(listed.stdout)]
    assert "" not in labels and sorted(labels) == sorted(set(labels))
    assert {"audit", "demo-supplier"} <= set(labels)

    proc = _gateway(home, "demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert set(_steps(proc.stdout)) == {"ok"}


@pytest.mark.parametrize("content", ["null", "[]", '{"clients": {"purchaser": "tok"}, "prescriber": "pw"}'])
def test_init_rewrites_a_demo_json_of_another_shape(tmp_path: Path, content: str) -> None:
    """demo.json edited by hand into valid JSON of another shape stopped every later `init` and
    `demo` with a traceback (AttributeError) until someone deleted it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "demo.json").write_text(content)
    proc = _gateway(home, "init")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    demo = json.loads((home / "demo.json").read_text())
    assert set(demo["clients"]) == {"purchaser", "supplier", "prescriber_app", "pharmacy",
                                    "compliance", "admin"}
    assert isinstance(demo["prescriber"]["password"], str) and demo["prescriber"]["totp_secret"]
    assert oct((home / "demo.json").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("name", ["a#b", "x=y"])
def test_a_home_path_softhsm_cannot_name_is_refused_before_anything_is_written(tmp_path: Path,
                                                                                name: str) -> None:
    """SoftHSM's configuration ends a value at '#' or a second '=': the token directory named
    another directory and `init` (and `demo`) died with a CalledProcessError traceback, after
    writing gateway.toml and softhsm2.conf."""
    home = tmp_path / name / "home"
    for command in ("init", "demo"):
        proc = _gateway(None, command, GATEWAY_HOME=str(home))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.startswith(f"error [home_unusable] {home}: SoftHSM cannot keep its token"), proc.stderr
    assert not home.exists()


def test_a_token_store_softhsm_refuses_is_one_line_with_a_code(tmp_path: Path) -> None:
    """softhsm2-util failing on the home's token store (here a path past what SoftHSM handles,
    about 1,100 characters) was a CalledProcessError traceback."""
    home = tmp_path.joinpath(*["d" * 120] * 10)
    proc = _gateway(home, "init")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error [hsm_init_failed] softhsm2-util --show-slots failed (exit 1): "
                                  "ERROR: "), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_home_that_is_a_file_says_so(tmp_path: Path) -> None:
    """GATEWAY_HOME naming a file was `home_unusable ...: File exists`, which says nothing."""
    target = tmp_path / "a-file"
    target.write_text("not a home\n")
    for command in ("init", "demo"):
        proc = _gateway(None, command, GATEWAY_HOME=str(target))
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.strip() == (f"error [home_unusable] {target}: not a directory: "
                                       "the home must be a directory"), proc.stderr
    assert target.read_text() == "not a home\n"


def test_demo_tells_a_broken_audit_trail_in_words(tmp_path: Path) -> None:
    """A record edited in the database: the last step fails and says where and why, not the
    repr of a result object (`StepFailed: AuditVerifyResult(ok=False, ...)`); exit 1."""
    home = tmp_path / "home"
    _init(home)
    db = sqlite3.connect(home / "gateway.sqlite3")
    try:  # what someone with write access to the file can do: lift the guard, edit, restore it
        triggers = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                              "AND tbl_name = 'audit_log'").fetchall()
        for name, _ in triggers:
            db.execute(f'DROP TRIGGER "{name}"')
        db.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
        for _, sql in triggers:
            db.execute(sql)
        db.commit()
    finally:
        db.close()
    proc = _gateway(home, "demo")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert _steps(proc.stdout)[-1] == "FAILED" and _steps(proc.stdout).count("FAILED") == 1
    assert "audit trail BROKEN at record 1: hash_mismatch: " in proc.stdout, proc.stdout[-2000:]
    assert "StepFailed" not in proc.stdout and "AuditVerifyResult(" not in proc.stdout


def _dev_sh_would_install_packages() -> bool:
    tools = ("softhsm2-util", "xmlsec1", "openssl", "pkcs11-tool", "wrk", "strace")
    if any(shutil.which(t) is None for t in tools) or not Path("/usr/lib/softhsm/libsofthsm2.so").exists():
        return True
    return subprocess.run([sys.executable, "-c", "import venv, ensurepip"]).returncode != 0


@pytest.mark.skipif(_dev_sh_would_install_packages(), reason="dev.sh would run apt-get here")
def test_dev_sh_remakes_a_venv_left_without_pip_and_names_the_step_that_fails(tmp_path: Path) -> None:
    """`python3 -m venv` interrupted leaves bin/python and no pip: every later `dev.sh` died on
    `bin/pip: No such file or directory` (127). Now the venv is made again; the package index
    being unreachable here, the install fails, and dev.sh says which step failed."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = {**os.environ, "GATEWAY_VENV": str(venv), "PYTHON": sys.executable,
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "dev.sh"), "setup"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode not in (0, 127), proc.stderr[-2000:]
    assert "No such file or directory" not in proc.stderr, proc.stderr[-2000:]
    assert "dev.sh: failed while installing the package and its dependencies" in proc.stderr, proc.stderr[-2000:]
    assert subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"],
                          capture_output=True).returncode == 0
    assert not list(venv.glob(".installed-*"))  # the next run installs again


def test_dev_sh_never_clears_a_directory_that_is_not_a_venv(tmp_path: Path) -> None:
    target = tmp_path / "not-a-venv"
    target.mkdir()
    (target / "precious").write_text("keep\n")
    if _dev_sh_would_install_packages():
        pytest.skip("dev.sh would run apt-get here")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "dev.sh"), "setup"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "GATEWAY_VENV": str(target)})
    assert proc.returncode == 1 and "is not a virtual environment" in proc.stderr, proc.stderr
    assert (target / "precious").read_text() == "keep\n"


async def test_two_demos_signing_their_order_in_one_second_both_succeed(
        initialized_home: dict, softhsm_settings: Settings, hsm: Hsm, tmp_path: Path) -> None:
    """The order number came from the clock's second: two `gateway demo` on one home in the
    same second signed the very same order, and the gateway refused the second (409
    duplicate_document), failing that demo."""
    import asyncio
    import time
    from dataclasses import replace

    import aiohttp
    from aiohttp.test_utils import TestServer

    from gateway.clients import add_client
    from gateway.demo import Story, step_purchaser_signs_order
    from gateway.http.app import create_app
    from gateway.storage import storage_for_url

    settings = replace(softhsm_settings, database_url=f"sqlite:///{tmp_path / 'gw.sqlite3'}")
    storage = storage_for_url(settings.database_url)
    await storage.open()
    label = initialized_home["keys"]["purchaser"]["label"]
    _client, token = await add_client(storage, "demo-purchaser", "purchaser", [label])
    demo = {**initialized_home, "clients": {"purchaser": {"token": token, "role": "purchaser"}}}
    server = TestServer(create_app(settings, hsm=hsm, storage=storage), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            stories = [Story(settings=settings, demo=demo, base=str(server.make_url("")).rstrip("/"),
                             session=session) for _ in range(2)]
            await asyncio.sleep(1.02 - time.time() % 1)  # both within one second of the clock
            for story in stories:
                await step_purchaser_signs_order(story)
        numbers = {story.facts["order_number"] for story in stories}
        assert len(numbers) == 2
    finally:
        await server.close()
        await storage.close()


PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """GATEWAY_DATABASE_URL for a fresh schema of the test database, dropped afterwards."""
    import asyncio
    import secrets

    import asyncpg

    schema = f"gw_demo_edges_{secrets.token_hex(4)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(run(f"CREATE SCHEMA {schema}"))
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL at {PG_URL} unusable: {exc} (CI is set)")
        pytest.skip(f"PostgreSQL at {PG_URL} unusable: {exc}")
    try:
        yield f"{PG_URL}?search_path={schema}"
    finally:
        asyncio.run(run(f"DROP SCHEMA {schema} CASCADE"))


def test_a_second_home_on_one_postgresql_database_is_refused_before_it_writes(
        tmp_path: Path, pg_schema_url: str) -> None:
    """Two homes, each with its own SoftHSM token and so its own audit key, on one database: the
    second home's demo wrote its records and a checkpoint signed by its own audit key into the
    first one's trail, and from then on its last step and `gateway audit verify` failed on both
    homes (checkpoints are append-only). Now the second home's `init` is refused, nothing
    written, and the first home's trail stays intact."""
    first, second = tmp_path / "first", tmp_path / "second"
    proc = _gateway(first, "demo", GATEWAY_DATABASE_URL=pg_schema_url)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert set(_steps(proc.stdout)) == {"ok"}

    for command in ("demo", "init"):
        proc = _gateway(second, command, GATEWAY_DATABASE_URL=pg_schema_url)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
        assert proc.stderr.startswith("error [audit_key_mismatch] the database's audit trail is "
                                      "checkpointed with an audit key ('audit') this home's HSM "
                                      "does not hold"), proc.stderr[-2000:]
    assert not (second / "demo.json").exists()

    proc = _gateway(first, "audit", "verify", GATEWAY_DATABASE_URL=pg_schema_url)
    assert proc.returncode == 0 and "audit trail intact" in proc.stdout, proc.stdout + proc.stderr
    proc = _gateway(first, "demo", GATEWAY_DATABASE_URL=pg_schema_url)  # the first home still plays
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
