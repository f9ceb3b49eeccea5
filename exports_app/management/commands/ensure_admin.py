"""Create the admin user named by DJANGO_SUPERUSER_USERNAME unless it exists (idempotent)."""

import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Create the superuser from DJANGO_SUPERUSER_USERNAME/PASSWORD/EMAIL if it is missing."

    def handle(self, *args, **options) -> None:
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME")
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
        if not username or not password:
            raise CommandError("set DJANGO_SUPERUSER_USERNAME and DJANGO_SUPERUSER_PASSWORD")
        users = get_user_model()
        if users.objects.filter(username=username).exists():
            self.stdout.write(f"admin user {username!r} exists")
            return
        users.objects.create_superuser(
            username=username, email=os.environ.get("DJANGO_SUPERUSER_EMAIL", ""), password=password
        )
        self.stdout.write(f"created admin user {username!r}")
