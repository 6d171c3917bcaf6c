"""A site runs only the federation's app: `flwr-clientapp` with a check of the app bundle first.

Flower 1.42's app signing (`flower-supernode --trusted-entities`) needs a SuperLink that marks bundles
`valid_license`, which the open-source SuperLink never does. So `brainjepa-client` puts this in front of
Flower's `flwr-clientapp` (a private `flwr-clientapp` script first on the SuperNode's PATH): before the
bundle (FAB) is installed, it must hold nothing but its `pyproject.toml` (and Flower's `.info/` manifest)
and name exactly this package's apps as its components. Any other bundle (one carrying code, or naming
another ClientApp) is refused: the site logs why and the coordinator gets an error reply; nothing of
the bundle runs. The ClientApp that does run is the one installed at the site.

It also scrubs every error reply before Flower pushes it (`scrub_error`, `client.redact.scrub`): ours are
scrubbed already, but when a ClientApp raises, Flower itself replies "<class ...>:<'message'>" with the
exception's text, which may name paths or subject ids. The site's console keeps the full traceback.
With `brainjepa-client --trust-any-app` (TRUST_ANY_APP_ENV=1) only the bundle check is skipped.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import zipfile

from flwr.app import Error, Message

from client.redact import scrub

log = logging.getLogger(__name__)

TRUST_ANY_APP_ENV = "BRAINJEPA_TRUST_ANY_APP"
TRUSTED_COMPONENTS = {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}


class UntrustedApp(RuntimeError):
    """The coordinator sent an app bundle this site does not run."""


def check_fab(content: bytes) -> None:
    """Raise UntrustedApp unless the FAB is the federation's app: only pyproject.toml (+ `.info/`), whose
    `[tool.flwr.app.components]` are exactly TRUSTED_COMPONENTS."""
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        with zipfile.ZipFile(io.BytesIO(content)) as z:
            names = z.namelist()
            extra = sorted(n for n in names if n != "pyproject.toml" and not n.startswith(".info/"))
            if extra:
                raise UntrustedApp(
                    f"the app bundle carries files besides pyproject.toml: {extra[:10]} (this site runs "
                    "only the brainjepa ClientApp installed here)"
                )
            toml = tomllib.loads(z.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UntrustedApp(f"unreadable app bundle: {e}") from e
    components = toml.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components != TRUSTED_COMPONENTS:
        raise UntrustedApp(f"the app bundle names components {components}, this site runs only {TRUSTED_COMPONENTS}")


def scrub_error(message: Message) -> Message:
    """`message` with its error reason (if it carries one) scrubbed of paths and subject ids."""
    if message.has_error():
        message.error = Error(code=message.error.code, reason=scrub(message.error.reason or ""))
    return message


def main() -> None:
    """`flwr-clientapp`, with `check_fab` before Flower installs the bundle and `scrub_error` before a
    reply is pushed."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    install, push = runtime.install_from_fab, runtime.push_message

    def checked_install(content: bytes, *args: object, **kwargs: object) -> object:
        try:
            check_fab(content)
        except UntrustedApp as e:
            log.error("refused the coordinator's app: %s", e)
            raise
        return install(content, *args, **kwargs)

    def scrubbed_push(client: object, message: Message, context: object) -> None:
        push(client, scrub_error(message), context)

    if os.environ.get(TRUST_ANY_APP_ENV) != "1":
        runtime.install_from_fab = checked_install  # type: ignore[assignment]
    runtime.push_message = scrubbed_push  # type: ignore[assignment]
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


if __name__ == "__main__":
    main()
