"""Runs last (file order): no token the suite has seen appears in any proxy log (DESIGN.md §3)."""

import re

from e2e_helpers import SEEN_TOKENS, register

TOKEN_SHAPE = re.compile(r"(syt|syr|mrpat|mrprt)_[A-Za-z0-9_\-]{12,}")


def test_no_tokens_in_proxy_logs(proxy, child_logs):
    register(proxy.api, refresh=True)  # at least one proxy session even when run alone
    register(proxy.api, refresh=None)
    proxy_logs = [log for log in child_logs if log.name.startswith("proxy")]
    assert proxy_logs
    for log in proxy_logs:
        text = log.path.read_text(errors="replace")
        leaked = [t for t in SEEN_TOKENS if t in text]
        assert not leaked, f"{len(leaked)} issued token(s) appear in {log.path}"
        shaped = TOKEN_SHAPE.findall(text)
        assert not shaped, f"token-shaped strings with prefixes {sorted(set(shaped))} appear in {log.path}"
        assert "Bearer " not in text, f"an Authorization value appears in {log.path}"
