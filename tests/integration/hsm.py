"""A SoftHSM2 token and a psap-keys store for the tests, owned by an OS user of its own (the key
user), as the runbook sets them up: the same PKCS#11 as hardware and cloud HSMs."""
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from psap_cluster import ROOT

KEY_USER = "psapkeys"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
BINARY = ROOT / "target" / "debug" / "psap-keys"


def sh(*cmd, user=None, check=True, env=None, **kw):
    prefix = ["sudo", "-n", "-u", user] if user else []
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RUST_BACKTRACE", None)
    return subprocess.run(prefix + [str(c) for c in cmd], check=check, capture_output=True, text=True, env=full_env, **kw)


class Hsm:
    """A SoftHSM2 token and a psap-keys store, both readable only by the key user."""

    def __init__(self, base: Path, name: str):
        self.base = base
        self.dir = base / name
        self.dir.mkdir(mode=0o700)
        shutil.chown(self.dir, KEY_USER, KEY_USER)
        (self.dir / "tokens").mkdir(mode=0o700)
        shutil.chown(self.dir / "tokens", KEY_USER, KEY_USER)
        self.conf = self.dir / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.dir / 'tokens'}\nobjectstore.backend = file\n")
        shutil.chown(self.conf, KEY_USER, KEY_USER)
        self.pin = self.dir / "pin"
        self.pin.write_text("4321\n")
        shutil.chown(self.pin, KEY_USER, KEY_USER)
        os.chmod(self.pin, 0o600)
        self.store = self.dir / "store"
        self.env = {"SOFTHSM2_CONF": str(self.conf), "PSAP_KEYS_MODULE": MODULE, "PSAP_KEYS_TOKEN": "psap",
                    "PSAP_KEYS_PIN_FILE": str(self.pin), "PSAP_KEYS_STORE": str(self.store)}
        self.run_raw("softhsm2-util", "--init-token", "--free", "--label", "psap", "--pin", "4321", "--so-pin", "8765")
        self.keys("init")

    def run_raw(self, *cmd, check=True):
        env_args = [f"{k}={v}" for k, v in self.env.items()]
        return sh("env", *env_args, *cmd, user=KEY_USER, check=check)

    def keys(self, *args, check=True):
        return self.run_raw(BINARY, *args, check=check)

    def wrapper(self):
        """What psap.key_command runs (through sudo, as the key user): root-owned, fixed arguments."""
        w = self.base / "emit"
        env_args = " ".join(f"{k}={v}" for k, v in self.env.items())
        w.write_text(f"#!/bin/sh\nexec env -i {env_args} {BINARY} emit\n")
        os.chmod(w, 0o755)
        return w



    @staticmethod
    def world(base: Path):
        """The key user, the psap-keys binary, a first token in `base`, and the sudo rule that
        lets postgres run `base/emit` (and nothing else) as the key user."""
        sh("cargo", "build", "-q", "-p", "psap_keys", cwd=ROOT)
        try:
            pwd.getpwnam(KEY_USER)
        except KeyError:
            sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", KEY_USER)
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(mode=0o755)
        # The key user must reach the binary: the checkout is world-readable here, as in CI.
        hsm = Hsm(base, "hsm1")
        sudoers = Path(f"/etc/sudoers.d/{base.name}")
        sudoers.write_text(f"postgres ALL=({KEY_USER}) NOPASSWD: {base / 'emit'}\n")
        os.chmod(sudoers, 0o440)
        assert sh("visudo", "-cf", sudoers, check=False).returncode == 0
        return hsm, sudoers

    def shell_prelude(self):
        """`psap-keys` as a shell function: the tool run as the key user with its environment."""
        env_args = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f'psap-keys() {{ sudo -n -u {KEY_USER} env {env_args} {BINARY} "$@"; }}\n'
