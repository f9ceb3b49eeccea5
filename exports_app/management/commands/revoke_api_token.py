"""`manage.py revoke_api_token KEY` or `--all-of USER`: revoke API tokens at once."""

from django.core.management.base import BaseCommand, CommandError

from exports_app.services.api_tokens import revoke_all_tokens, revoke_token


class Command(BaseCommand):
    help = "Revoke one API token (by the key list_api_tokens shows, or the whole token)."

    def add_arguments(self, parser) -> None:
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("key", nargs="?", help="the token's key, or the token itself")
        target.add_argument("--all-of", metavar="USER", help="revoke every token of USER")

    def handle(self, *args, key: str | None, all_of: str | None, **options) -> None:
        if all_of:
            self.stdout.write(f"revoked {revoke_all_tokens(all_of)} token(s) of {all_of!r}")
            return
        try:
            revoked = revoke_token(key)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if not revoked:
            raise CommandError(f"no token {key!r}")
        self.stdout.write(f"revoked token {key[:15]}")
