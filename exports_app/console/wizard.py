"""The export wizard: the common path in one short form (name, size, node, TLS requirement),
then a page that watches the create job until the export is ready and says how to connect.

It creates the export with the same service as the API and the admin
(`services.exports.create_export`), after the model's own validation, and needs the same
permission (`add_export`).
"""

from __future__ import annotations

from django import forms
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse

from exports_app.console import export_page
from exports_app.console.forms import EscapedHelpTextMixin
from exports_app.models import Export, Job, WorkerNode
from exports_app.services import bundles, exports
from exports_app.validators import parse_size

__all__ = ["ExportWizardForm", "wizard_progress_view", "wizard_view"]

ADD_EXPORT = "exports_app.add_export"


class ExportWizardForm(EscapedHelpTextMixin, forms.ModelForm):
    size = forms.CharField(
        help_text='Bytes, or with a binary unit: "10G", "512M", "1T".',
        widget=forms.TextInput(attrs={"placeholder": "10G"}),
    )

    class Meta:
        model = Export
        fields = ["name", "size", "node", "tls_required"]
        labels = {"tls_required": "Require TLS"}
        widgets = {"name": forms.TextInput(attrs={"size": 40, "autofocus": True})}

    def clean_size(self) -> int:
        try:
            return parse_size(self.cleaned_data["size"].strip())
        except forms.ValidationError:
            raise
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None


def _admin_context(request: HttpRequest, title: str) -> dict:
    from django.contrib import admin

    return {**admin.site.each_context(request), "title": title}


def wizard_view(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(ADD_EXPORT):
        raise PermissionDenied
    initial = {}
    nodes = list(WorkerNode.objects.values_list("pk", flat=True)[:2])
    if len(nodes) == 1:
        initial["node"] = nodes[0]
    form = ExportWizardForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        export = form.save(commit=False)
        exports.create_export(export)
        return redirect("admin:console_export_wizard_progress", export.pk)
    context = {**_admin_context(request, "New export"), "form": form}
    return TemplateResponse(request, "admin/console/wizard.html", context)


def wizard_progress_view(request: HttpRequest, pk: int) -> HttpResponse:
    """The create job's progress; htmx reloads the part until the export is ready or failed."""
    if not request.user.has_perm(ADD_EXPORT):
        raise PermissionDenied
    export = get_object_or_404(Export.objects.select_related("node__tls_policy"), pk=pk)
    job = Job.objects.filter(export=export).order_by("pk").first()
    context = {
        **_admin_context(request, f"New export {export}"),
        "export": export,
        "job": job,
        "done": export.state in ("ready", "failed"),
        "commands": bundles.client_commands(export),
        "allocated": export_page.allocated_bytes(export),
    }
    template = (
        "admin/console/_wizard_progress.html"
        if request.htmx
        else "admin/console/wizard_progress.html"
    )
    return TemplateResponse(request, template, context)
