"""API permissions: Django model permissions, reads included."""

from rest_framework.permissions import DjangoModelPermissions

__all__ = ["ModelPermissions"]


class ModelPermissions(DjangoModelPermissions):
    """Like DRF's DjangoModelPermissions, but a read needs the model's `view` permission too."""

    perms_map = {
        **DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }
