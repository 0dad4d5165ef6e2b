"""`gateway init` sets up a whole home and is idempotent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from gateway.catalog import load_catalog
from gateway.config import Settings
from gateway.signing.dea import dea_number_matches
from gateway.signing.hsm import Hsm


def test_demo_json_names_everything(initialized_home: dict, softhsm_settings: Settings) -> None:
    demo = json.loads(softhsm_settings.demo_json.read_text())
    assert demo == initialized_home
    assert oct(softhsm_settings.demo_json.stat().st_mode & 0o777) == "0o600"
    assert set(demo["clients"]) == {"purchaser", "supplier", "prescriber_app", "pharmacy", "compliance", "admin"}
    assert {"purchaser", "supplier", "prescriber", "pharmacy"} <= set(demo["keys"])
    for role, key in demo["keys"].items():
        cert = x509.load_pem_x509_certificate(Path(key["certificate"]).read_bytes())
        if key["profile"].startswith("csos"):
            assert dea_number_matches(cert, key["dea_number"]), role
    assert Path(demo["trust_bundle"]).read_text().count("BEGIN CERTIFICATE") >= 3
    catalog = load_catalog(demo["catalog"])
    assert any(p.schedule == "II" for p in catalog.values())
    assert demo["prescriber"]["totp_secret"] and demo["prescriber"]["password"]


def test_demo_keys_live_in_the_hsm_with_their_certificates(initialized_home: dict, hsm: Hsm) -> None:
    stored = {k.label: k for k in hsm.list_keys()}
    for key in initialized_home["keys"].values():
        assert stored[key["label"]].has_certificate
        assert hsm.key_protection(key["label"])["extractable"] is False
    assert "audit" in stored


def test_init_is_idempotent_and_keeps_tokens(initialized_home: dict, softhsm_settings: Settings) -> None:
    before = json.loads(softhsm_settings.demo_json.read_text())
    proc = subprocess.run([sys.executable, "-m", "gateway", "--home", str(softhsm_settings.home), "init"],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    after = json.loads(softhsm_settings.demo_json.read_text())
    assert after == before


def test_home_secrets_are_owner_only(initialized_home: dict, softhsm_settings: Settings) -> None:
    """gateway.toml holds the HSM PINs, the database the archive and token hashes."""
    for path in (softhsm_settings.config_path, softhsm_settings.sqlite_path, softhsm_settings.demo_json):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    assert oct(softhsm_settings.pki_dir.joinpath("private").stat().st_mode & 0o777) == "0o700"


def test_default_config_is_written_once_owner_only_and_quoted(tmp_path: Path) -> None:
    from dataclasses import replace

    from gateway.config import load_settings, write_default_config

    home = tmp_path / "new-home"
    settings = Settings(home=home)
    settings = replace(settings, hsm=replace(settings.hsm, module='/opt/hsm "v2"\\lib.so', user_pin='9"9'))
    write_default_config(settings)
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    assert oct(settings.config_path.stat().st_mode & 0o777) == "0o600"
    loaded = load_settings(home)
    assert loaded.hsm.module == '/opt/hsm "v2"\\lib.so' and loaded.hsm.user_pin == '9"9'
    # The operator's file is never overwritten.
    settings.config_path.write_text('[hsm]\ntoken_label = "mine"\n')
    write_default_config(settings)
    assert load_settings(home).hsm.token_label == "mine"


def test_concurrent_inits_of_a_new_home_make_one_of_everything(tmp_path: Path) -> None:
    """Two `gateway init` at once: both succeed, and the home has one token, one key per label
    (two audit keys under one label made the home unusable) and demo tokens that work."""
    home = tmp_path / "home"
    procs = [subprocess.Popen([sys.executable, "-m", "gateway", "--home", str(home), "init"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    listed = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "keys", "list", "--json"],
                            capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert listed.returncode == 0, listed.stderr
    labels = [k["label"] for k in json.loads(listed.stdout)]
    assert sorted(labels) == sorted(set(labels)) and "audit" in labels
    demo = json.loads((home / "demo.json").read_text())
    assert {k["label"] for k in demo["keys"].values()} <= set(labels)

    import asyncio

    from gateway.clients import authenticate
    from gateway.config import load_settings
    from gateway.storage import open_storage

    async def roles() -> dict[str, str | None]:
        async with open_storage(load_settings(home)) as storage:
            return {name: getattr(await authenticate(storage, c["token"]), "role", None)
                    for name, c in demo["clients"].items()}

    assert asyncio.run(roles()) == {name: c["role"] for name, c in demo["clients"].items()}


def _gateway(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_DATABASE_URL", "GATEWAY_PKCS11_LIB")}
    return subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=300, env={**full, **env})


def test_init_refusals_are_one_line_with_a_code_and_a_later_init_completes(tmp_path: Path) -> None:
    """What stops `init` (or `demo`) is `error [code]: ...` and exit 1, not a traceback; nothing
    else is written, and `init` run again once the cause is gone sets the home up."""
    home = tmp_path / "home"
    for command in ("init", "demo"):
        proc = _gateway(home, command, GATEWAY_PKCS11_LIB="/etc/passwd")  # not a PKCS#11 library
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.startswith("error [hsm_unavailable] HSM module /etc/passwd unusable"), proc.stderr
    assert not (home / "demo.json").exists() and not (home / "gateway.sqlite3").exists()

    pin_home = tmp_path / "pin-home"
    pin_home.mkdir()
    (pin_home / "gateway.toml").write_text('[hsm]\nuser_pin = "12"\n')  # softhsm2-util would refuse it
    proc = _gateway(pin_home, "init")
    assert proc.returncode == 1 and proc.stderr.startswith("error [hsm_pin_invalid]"), proc.stderr[-2000:]

    (tmp_path / "a-file").touch()
    proc = _gateway(tmp_path / "a-file" / "home", "init")
    assert proc.returncode == 1 and proc.stderr.startswith("error [home_unusable]"), proc.stderr[-2000:]
    assert "Not a directory" in proc.stderr

    # The module named for the failed run did not stay in the home's gateway.toml.
    assert "/etc/passwd" not in (home / "gateway.toml").read_text()
    proc = _gateway(home, "init")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads((home / "demo.json").read_text())["clients"]) == {
        "purchaser", "supplier", "prescriber_app", "pharmacy", "compliance", "admin"}


def test_init_makes_an_existing_home_private(tmp_path: Path) -> None:
    """A home made beforehand under a lax umask, here world-writable: anyone could have replaced
    gateway.toml (and so the PKCS#11 library loaded) whatever the file's own mode."""
    home = tmp_path / "shared"
    home.mkdir()
    os.chmod(home, 0o777)
    proc = _gateway(home, "init")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert oct(home.stat().st_mode & 0o777) == "0o700"


def test_a_pin_from_the_environment_stays_out_of_gateway_toml(tmp_path: Path) -> None:
    """GATEWAY_HSM_PIN keeps the PIN out of files: `init` creates the token with it but does not
    write it to gateway.toml; the gateway logs in with it, and without it the login is refused."""
    home = tmp_path / "home"
    proc = _gateway(home, "init", GATEWAY_HSM_PIN="env-only-pin-7")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "env-only-pin-7" not in (home / "gateway.toml").read_text()
    assert _gateway(home, "keys", "list", GATEWAY_HSM_PIN="env-only-pin-7").returncode == 0
    refused = _gateway(home, "keys", "list")
    assert refused.returncode != 0 and "hsm_login_failed" in refused.stderr, refused.stderr[-2000:]
