"""`manage.py list_api_tokens [USER]`: each token's key, owner, creation and expiry."""

from django.core.management.base import BaseCommand

from exports_app.services.api_tokens import tokens_of


class Command(BaseCommand):
    help = "List API tokens (their public keys, never the tokens)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username", nargs="?")

    def handle(self, *args, username: str | None, **options) -> None:
        for token in tokens_of(username):
            expiry = token.expiry.isoformat(timespec="seconds") if token.expiry else "never"
            created = token.created.isoformat(timespec="seconds")
            self.stdout.write(
                f"{token.token_key}  {token.user.username}  created {created}  expires {expiry}"
            )
