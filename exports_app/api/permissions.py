"""API permissions: Django model permissions, reads included, plus per-action permissions."""

from rest_framework.permissions import DjangoModelPermissions, IsAuthenticated

__all__ = ["ModelPermissions"]


class ModelPermissions(DjangoModelPermissions):
    """Like DRF's DjangoModelPermissions, but a read needs the model's `view` permission too.

    A viewset can name the permissions of its extra actions in `action_permissions`
    (`{"revoke": ["exports_app.revoke_certificate"]}`); they replace the method's default.
    """

    perms_map = {
        **DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }

    def has_permission(self, request, view) -> bool:
        action_perms = getattr(view, "action_permissions", {}).get(getattr(view, "action", None))
        if action_perms is None:
            return super().has_permission(request, view)
        # Returning False for an anonymous user makes DRF answer 401 (TokenAuthentication sends
        # WWW-Authenticate), and 403 for an authenticated one.
        if not IsAuthenticated().has_permission(request, view):
            return False
        return request.user.has_perms(action_perms)
