"""Routes of the REST API, mounted at /api/v1/."""

from . import jobs, sessions, views
from .base import NBDWebRouter

router = NBDWebRouter()
router.register("nodes", views.WorkerNodeViewSet)
router.register("tls-policies", views.TLSPolicyViewSet)
router.register("exports", views.ExportViewSet)
router.register("authorities", views.CertificateAuthorityViewSet)
router.register("certificates", views.CertificateViewSet)
router.register("jobs", jobs.JobViewSet)
router.register("sessions", sessions.SessionViewSet, basename="session")

urlpatterns = router.urls
