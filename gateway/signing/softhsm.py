"""SoftHSM set-up for a home: its configuration file and an initialised token.

Only for SoftHSM (local runs and tests). A production PKCS#11 module is initialised by its own
tools; the gateway then only needs the module path, the token label and the PIN.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import subprocess
import time
import tty
from pathlib import Path

from gateway.config import Settings
from gateway.signing.errors import HsmError


def is_softhsm(module: str) -> bool:
    return "softhsm" in Path(module).name.lower()


def write_softhsm_conf(settings: Settings) -> Path:
    settings.token_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.token_dir, 0o700)
    conf = settings.softhsm_conf
    text = (
        f"directories.tokendir = {settings.token_dir}/\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "slots.mechanisms = ALL\n"
    )
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return conf


def point_environment_at(settings: Settings) -> None:
    """SoftHSM reads SOFTHSM2_CONF at C_Initialize; set it before the module is (re)initialised."""
    if is_softhsm(settings.hsm.module):
        os.environ["SOFTHSM2_CONF"] = str(settings.softhsm_conf)


def _token_labels(conf: Path) -> list[str]:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise HsmError("softhsm2-util not found: install the softhsm2 package", code="hsm_not_installed")
    out = subprocess.run([util, "--show-slots"], env={**os.environ, "SOFTHSM2_CONF": str(conf)},
                         capture_output=True, text=True, check=True).stdout
    labels = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Label:"):
            label = line.split(":", 1)[1].strip()
            if label:
                labels.append(label)
    return labels


def ensure_softhsm_token(settings: Settings) -> bool:
    """Create the SoftHSM configuration and the token if missing. Returns True when it created one."""
    if not is_softhsm(settings.hsm.module):
        return False
    conf = write_softhsm_conf(settings)
    # Look and create under one lock: two `gateway init` at once would otherwise both find no
    # token and both create one, and a label on two tokens makes the home unusable.
    with open(settings.token_dir / ".init.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if settings.hsm.token_label in _token_labels(conf):
            return False
        _init_token(conf, settings.hsm.token_label, settings.hsm.so_pin, settings.hsm.user_pin)
    return True


def _init_token(conf: Path, label: str, so_pin: str, user_pin: str, timeout: float = 30.0) -> None:
    """`softhsm2-util --init-token`, the PINs typed at its prompts rather than given as arguments
    (any local user can read a process's arguments). It reads PINs only from a terminal, so it
    runs on a pseudo-terminal in raw mode (a PIN passes as written: no line editing, no signal
    keys), and each answer is typed when its prompt appears (SO PIN twice, then user PIN twice)."""
    for name, pin in (("SO PIN", so_pin), ("user PIN", user_pin)):
        if not 4 <= len(pin) <= 255 or any(c in pin for c in "\r\n\0"):
            raise HsmError(f"the token's {name} must be 4 to 255 characters on one line",
                           code="hsm_pin_invalid")
    command = ["softhsm2-util", "--init-token", "--free", "--label", label]
    answers = [so_pin, so_pin, user_pin, user_pin]
    try:
        primary, secondary = pty.openpty()
    except OSError as exc:  # no /dev/ptmx (a bare container): the PINs have no safe way in
        raise HsmError(f"no pseudo-terminal to type the token PINs into softhsm2-util: {exc}",
                       code="hsm_init_failed") from exc
    tty.setraw(secondary)
    try:
        proc = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=subprocess.PIPE,
                                env={**os.environ, "SOFTHSM2_CONF": str(conf)}, start_new_session=True)
    except BaseException:
        os.close(primary)
        raise
    finally:
        os.close(secondary)
    shown, typed = b"", 0
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline or shown.count(b"PIN:") > len(answers):
                proc.kill()  # stuck, or asking again: a PIN was refused
                break
            if select.select([primary], [], [], 0.1)[0]:
                try:
                    shown += os.read(primary, 4096)
                except OSError:  # the tool closed the terminal
                    continue
            while typed < min(shown.count(b"PIN:"), len(answers)):
                os.write(primary, answers[typed].encode() + b"\n")
                typed += 1
    finally:
        os.close(primary)
        _out, err = proc.communicate()
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()[-300:] or "no answer"
        raise HsmError(f"softhsm2-util could not create token '{label}': {message}", code="hsm_init_failed")
