"""Routes of the REST API, mounted at /api/v1/."""

from django.urls import path

from . import events, jobs, sessions, views, webhooks
from .base import NBDWebRouter

router = NBDWebRouter()
router.register("nodes", views.WorkerNodeViewSet)
router.register("tls-policies", views.TLSPolicyViewSet)
router.register("exports", views.ExportViewSet)
router.register("authorities", views.CertificateAuthorityViewSet)
router.register("certificates", views.CertificateViewSet)
router.register("jobs", jobs.JobViewSet)
router.register("sessions", sessions.SessionViewSet, basename="session")
router.register("webhooks", webhooks.WebhookViewSet)

urlpatterns = [
    path("events/", events.EventListView.as_view(), name="event-list"),
    path("events/stream/", events.EventStreamView.as_view(), name="event-stream"),
    *router.urls,
]
