"""URL routes: the admin, the REST API under /api/v1/, and the OpenAPI schema and docs."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("exports_app.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # Both read their scripts from the app's static files (drf-spectacular-sidecar).
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path(
        "api/redoc/",
        SpectacularRedocView.as_view(url_name="schema", template_name="api/redoc.html"),
        name="api-redoc",
    ),
]

handler404 = "nbdweb.errors.not_found"
