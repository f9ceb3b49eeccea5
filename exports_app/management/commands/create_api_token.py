"""`manage.py create_api_token USER`: issue an API token; the token is the last line printed.

Only its digest is stored: this is the one time it is shown.
"""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from exports_app.services.api_tokens import issue_token


class Command(BaseCommand):
    help = "Issue a new API token for USER and print it (on the last line)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        lifetime = parser.add_mutually_exclusive_group()
        lifetime.add_argument(
            "--days", type=int, help="days until it expires (default: NBDWEB_API_TOKEN_TTL_DAYS)"
        )
        lifetime.add_argument("--no-expiry", action="store_true", help="a token that never expires")

    def handle(self, *args, username: str, days: int | None, no_expiry: bool, **options) -> None:
        if days is not None and days < 1:
            raise CommandError("--days must be at least 1")
        try:
            if no_expiry:
                row, token = issue_token(username, ttl=None)
            elif days is not None:
                row, token = issue_token(username, ttl=timedelta(days=days))
            else:
                row, token = issue_token(username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no such user: {username!r}") from None
        expiry = row.expiry.isoformat(timespec="seconds") if row.expiry else "never"
        self.stderr.write(f"token {row.token_key} for {username!r}, expires {expiry}")
        self.stdout.write(token)
