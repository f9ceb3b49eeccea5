"""The Django admin: every model, with filters, search, history and the day-to-day actions."""

from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from simple_history.admin import SimpleHistoryAdmin

from exports_app.admin_status import NodeStatusAdminMixin
from exports_app.choices import CertificateKind, KeyAlgorithm, TLSMode
from exports_app.console.admin import ExportPageAdminMixin, JobListAdminMixin
from exports_app.console.forms import (
    ClientRulesField,
    EscapedHelpTextMixin,
    NetworksField,
    WideNumberInput,
)
from exports_app.constants import MAX_VALIDITY_DAYS
from exports_app.formfields import ASCII_NUMBER_OVERRIDES, AsciiIntegerFormField, ascii_formfield
from exports_app.models import (
    Certificate,
    CertificateAuthority,
    Export,
    Job,
    TLSPolicy,
    WebhookDelivery,
    WebhookSubscription,
    WorkerNode,
)
from exports_app.models.tls import OPTIONALTLS_WARNING
from exports_app.services import bundles, ca, export_states, exports, provisioning, webhooks
from exports_app.services.certificates import NewAuthority, NewCertificate
from exports_app.validators import parse_size, validate_no_control_characters

__all__ = [
    "CertificateAdmin",
    "CertificateAuthorityAdmin",
    "ExportAdmin",
    "JobAdmin",
    "TLSPolicyAdmin",
    "WorkerNodeAdmin",
]


def human_size(size: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size} B"


def action_with_form(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet,
    form_class: type[forms.Form],
    title: str,
    apply: Callable[[forms.Form, QuerySet], None],
) -> TemplateResponse | None:
    """An admin action that asks for input on an intermediate page before applying."""
    if "apply" in request.POST:
        form = form_class(request.POST)
        if form.is_valid():
            apply(form, queryset)
            return None
    else:
        form = form_class()
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "form": form,
        "objects": list(queryset),
        "selected": request.POST.getlist(ACTION_CHECKBOX_NAME),
        "action": request.POST.get("action", ""),
        "opts": modeladmin.model._meta,
    }
    return TemplateResponse(request, "admin/exports_app/action_form.html", context)


# -- nodes and TLS policies --------------------------------------------------------------------


class AsciiNumbersAdminMixin:
    """Every integer field of the admin's forms reads ASCII digits only, as the API does
    (exports_app/formfields.py)."""

    formfield_overrides = ASCII_NUMBER_OVERRIDES


@admin.register(WorkerNode)
class WorkerNodeAdmin(AsciiNumbersAdminMixin, NodeStatusAdminMixin, SimpleHistoryAdmin):
    list_display = [
        "name",
        "listen",
        "public_address",
        "storage_root",
        "tls_policy",
        "export_count",
        "worker_status",
        "live_sessions",
    ]
    list_filter = ["tls_policy__mode", "tls_policy"]
    search_fields = ["name", "description", "listen", "storage_root"]
    readonly_fields = ["created", "last_updated", "worker_status", "live_sessions"]

    def get_queryset(self, request):
        # One count per listed node in the page's own query, not a query per row.
        return super().get_queryset(request).with_export_count()

    @admin.display(description="exports", ordering="export_count")
    def export_count(self, node: WorkerNode) -> int:
        count = getattr(node, "export_count", None)
        return node.exports.count() if count is None else count


class TLSPolicyForm(forms.ModelForm):
    class Meta:
        formfield_callback = ascii_formfield
        model = TLSPolicy
        fields = "__all__"

    def clean(self) -> dict:
        cleaned = super().clean()
        if "trusted_authorities" in cleaned:
            try:
                self.instance.validate_trusted_authorities(list(cleaned["trusted_authorities"]))
            except ValidationError as exc:
                self.add_error(None, exc.message_dict["trusted_authorities"])
        return cleaned


class SwitchTLSModeForm(forms.Form):
    mode = forms.ChoiceField(choices=TLSMode.choices)


@admin.register(TLSPolicy)
class TLSPolicyAdmin(AsciiNumbersAdminMixin, SimpleHistoryAdmin):
    form = TLSPolicyForm
    list_display = ["name", "mode", "server_certificate", "client_verification", "min_tls_version"]
    list_filter = ["mode", "client_verification", "min_tls_version"]
    search_fields = ["name", "description"]
    filter_horizontal = ["trusted_authorities"]
    readonly_fields = ["created", "last_updated"]
    actions = ["switch_tls_mode"]

    def save_model(self, request, obj: TLSPolicy, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if obj.mode == TLSMode.OPTIONALTLS:
            messages.warning(request, OPTIONALTLS_WARNING)

    @admin.action(description="Switch TLS mode", permissions=["change"])
    def switch_tls_mode(self, request, queryset):
        def apply(form, policies):
            mode = form.cleaned_data["mode"]
            for policy in policies:
                policy.mode = mode
                try:
                    policy.full_clean()
                    policy.validate_trusted_authorities(list(policy.trusted_authorities.all()))
                except ValidationError as exc:
                    problems = "; ".join(m for ms in exc.message_dict.values() for m in ms)
                    self.message_user(request, f"{policy.name}: {problems}", messages.ERROR)
                    continue
                policy.save()
                self.message_user(request, f"{policy.name}: switched to {mode}.", messages.SUCCESS)
            if mode == TLSMode.OPTIONALTLS:
                messages.warning(request, OPTIONALTLS_WARNING)

        return action_with_form(
            self, request, queryset, SwitchTLSModeForm, "Switch TLS mode", apply
        )


# -- exports -----------------------------------------------------------------------------------


class SizeFormField(forms.CharField):
    """Bytes or "10G"/"512M"/"1T" in the admin, like the API."""

    def prepare_value(self, value):
        return human_size(value) if isinstance(value, int) else value

    def to_python(self, value):
        value = super().to_python(value)
        if value in self.empty_values:
            return None
        return parse_size(value.strip())


class ExportForm(EscapedHelpTextMixin, forms.ModelForm):
    size = SizeFormField(help_text='Bytes, or with a binary unit: "10G", "512M", "1T".')
    force = forms.BooleanField(
        required=False,
        label="Allow shrinking",
        help_text="A smaller size destroys the data past the new end.",
    )
    allowed_clients = ClientRulesField(
        required=False,
        help_text="TLS client certificates allowed to connect; no row allows any client the "
        "node's TLS policy accepts.",
    )
    allowed_networks = NetworksField(
        help_text="One network per line (CIDR, e.g. 10.0.0.0/8); none allows any address."
    )

    class Meta:
        formfield_callback = ascii_formfield
        model = Export
        fields = "__all__"
        widgets = {
            "name": forms.TextInput(attrs={"size": 60}),
            "min_block_size": WideNumberInput(),
            "preferred_block_size": WideNumberInput(),
            "max_block_size": WideNumberInput(),
            "max_connections": WideNumberInput(),
        }

    def clean(self) -> dict:
        cleaned = super().clean()
        if self.instance.pk is None:
            return cleaned
        # construct_instance() has not run yet: self.instance still holds the stored size.
        new_size = cleaned.get("size")
        try:
            export_states.check_changeable(self.instance)
            if new_size is not None:
                exports.check_resize(self.instance, new_size, cleaned.get("force", False))
        except ValidationError as exc:
            self.add_error(None, exc)
        return cleaned


class ExportImportForm(forms.ModelForm):
    """An export whose image is an existing file under the node's storage root."""

    size = SizeFormField(help_text="The file's size (bytes or with a unit); the job checks it.")

    class Meta:
        formfield_callback = ascii_formfield
        model = Export
        fields = ["node", "name", "image_path", "size", "description", "read_only", "enabled"]
        widgets = {"name": forms.TextInput(attrs={"size": 60})}
        help_texts = {"image_path": "The existing file, relative to the node's storage root."}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["image_path"].required = True


class ResizeExportForm(forms.Form):
    size = SizeFormField(label="New size")
    force = forms.BooleanField(
        required=False, help_text="Allow shrinking (destroys the data past the new end)."
    )


@admin.register(Export)
class ExportAdmin(AsciiNumbersAdminMixin, ExportPageAdminMixin, SimpleHistoryAdmin):
    form = ExportForm
    list_display = [
        "__str__",
        "node",
        "display_size",
        "state_badge",
        "enabled",
        "read_only",
        "tls_required",
        "short_error",
    ]
    list_filter = ["state", "enabled", "read_only", "tls_required", "node"]
    search_fields = ["name", "description", "image_path"]
    readonly_fields = [
        "state",
        "last_error",
        "uri",
        "absolute_image_path",
        "content_sha256",
        "verified_at",
        "created",
        "last_updated",
    ]
    actions = [
        "enable_exports",
        "disable_exports",
        "resize_exports",
        "verify_exports",
        "wipe_and_delete_exports",
    ]

    def get_urls(self):
        view = path(
            "import/",
            self.admin_site.admin_view(self.import_view),
            name="exports_app_export_import",
        )
        return [view, *super().get_urls()]

    def has_import_permission(self, request) -> bool:
        return request.user.has_perms(["exports_app.add_export", "exports_app.import_export"])

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "can_import": self.has_import_permission(request)}
        return super().changelist_view(request, extra_context)

    def import_view(self, request: HttpRequest) -> HttpResponse:
        """Make an existing image file an export: the same service as POST …/exports/import/."""
        if not self.has_import_permission(request):
            raise PermissionDenied
        form = ExportImportForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            export = form.save(commit=False)
            try:
                exports.import_export(export)
            except ValidationError as exc:  # a file the job would refuse: a form error
                form.add_error(None, exc)
            else:
                self.message_user(
                    request,
                    f"{export}: the node's job checks {export.image_path!r} and takes it over.",
                    messages.SUCCESS,
                )
                return redirect(reverse("admin:exports_app_export_changelist"))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Import an existing image",
            "form": form,
        }
        return TemplateResponse(request, "admin/exports_app/export/import_form.html", context)

    def get_readonly_fields(self, request, obj=None):
        # Moving an image to another node or path is not something a form can do.
        extra = ["node", "image_path"] if obj is not None else []
        return [*self.readonly_fields, *extra]

    @admin.display(description="size", ordering="size")
    def display_size(self, export: Export) -> str:
        return human_size(export.size)

    @admin.display(description="last error")
    def short_error(self, export: Export) -> str:
        return export.last_error[:80]

    def save_model(self, request, obj: Export, form, change: bool) -> None:
        obj._history_user = request.user  # what SimpleHistoryAdmin.save_model would set
        if change:
            exports.save_export(
                obj, form.initial["size"], force=form.cleaned_data.get("force", False)
            )
        else:
            exports.create_export(obj)

    def delete_model(self, request, obj: Export) -> None:
        with transaction.atomic():
            provisioning.request_delete(obj)

    def delete_queryset(self, request, queryset) -> None:
        with transaction.atomic():
            for export in queryset:
                provisioning.request_delete(export)

    def _set_enabled(self, request, queryset, enabled: bool) -> None:
        changed = 0
        with transaction.atomic():
            for export in queryset.filter(enabled=not enabled):
                export.enabled = enabled
                export.save(update_fields=["enabled", "last_updated"])
                changed += 1
        word = "Enabled" if enabled else "Disabled"
        self.message_user(request, f"{word} {changed} export(s).", messages.SUCCESS)

    @admin.action(description="Enable selected exports", permissions=["change"])
    def enable_exports(self, request, queryset) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable selected exports", permissions=["change"])
    def disable_exports(self, request, queryset) -> None:
        self._set_enabled(request, queryset, False)

    @admin.action(description="Resize selected exports", permissions=["change"])
    def resize_exports(self, request, queryset):
        def apply(form, selected):
            new_size, force = form.cleaned_data["size"], form.cleaned_data["force"]
            for export in selected:
                # The API's POST …/resize/ calls the same function: the same refusals.
                try:
                    exports.resize_export(export, new_size, force)
                except ValidationError as exc:
                    self.message_user(
                        request, f"{export}: {' '.join(exc.messages)}", messages.ERROR
                    )
                    continue
                self.message_user(
                    request,
                    f"{export}: resize to {human_size(new_size)} requested.",
                    messages.SUCCESS,
                )

        return action_with_form(self, request, queryset, ResizeExportForm, "Resize exports", apply)

    @admin.action(description="Verify selected exports (sha256 job)", permissions=["change"])
    def verify_exports(self, request, queryset) -> None:
        requested = 0
        with transaction.atomic():
            for export in queryset:
                try:
                    provisioning.request_verify(export)
                except ValidationError as exc:
                    self.message_user(
                        request, f"{export}: {' '.join(exc.messages)}", messages.ERROR
                    )
                    continue
                requested += 1
        self.message_user(request, f"Verify requested for {requested} export(s).", messages.INFO)

    @admin.action(
        description="Delete selected exports, zeroing their images first", permissions=["delete"]
    )
    def wipe_and_delete_exports(self, request, queryset) -> None:
        with transaction.atomic():
            for export in queryset:
                provisioning.request_delete(export, wipe=True)
        self.message_user(
            request, f"Wipe and delete requested for {queryset.count()} export(s).", messages.INFO
        )


# -- jobs --------------------------------------------------------------------------------------


@admin.register(Job)
class JobAdmin(AsciiNumbersAdminMixin, JobListAdminMixin, admin.ModelAdmin):
    """Jobs are made by the export actions and the API; here they are watched and retried."""

    list_display = [
        "id",
        "kind",
        "export_link",
        "node",
        "state_badge",
        "progress_bar",
        "short_error",
        "requested_by",
        "created",
        "finished",
    ]
    list_filter = ["state", "kind", "node"]
    search_fields = ["export_name", "error", "celery_task_id"]
    list_select_related = ["export", "node", "requested_by"]
    readonly_fields = [
        "kind",
        "export",
        "export_name",
        "node",
        "state",
        "progress",
        "error",
        "params",
        "celery_task_id",
        "requested_by",
        "created",
        "started",
        "finished",
    ]
    actions = ["retry_jobs"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_retry_permission(self, request) -> bool:
        return request.user.has_perm("exports_app.retry_job")

    @admin.display(description="export", ordering="export_name")
    def export_link(self, job: Job) -> str:
        if job.export_id is None:
            return job.export_name[:80]
        url = reverse("admin:exports_app_export_change", args=[job.export_id])
        return format_html('<a href="{}">{}</a>', url, job.export_name[:80])

    @admin.display(description="error")
    def short_error(self, job: Job) -> str:
        return job.error[:80]

    @admin.action(description="Retry selected failed jobs", permissions=["retry"])
    def retry_jobs(self, request, queryset) -> None:
        for job in queryset:
            try:
                with transaction.atomic():
                    new_job = provisioning.retry_job(job)
            except provisioning.JobRefused as exc:
                self.message_user(request, f"{job}: {exc}", messages.ERROR)
                continue
            self.message_user(request, f"{job}: retried as job #{new_job.pk}.", messages.SUCCESS)


# -- certificates ------------------------------------------------------------------------------


class CertificateAuthorityAddForm(forms.ModelForm):
    """Create an internal CA (common name) or import one (certificate PEM, optional key)."""

    common_name = forms.CharField(
        max_length=64,
        required=False,
        validators=[validate_no_control_characters],
        help_text="Creates an internal CA.",
    )
    key_algorithm = forms.ChoiceField(choices=KeyAlgorithm.choices, initial=KeyAlgorithm.EC_P256)
    validity_days = AsciiIntegerFormField(min_value=1, max_value=MAX_VALIDITY_DAYS, required=False)
    certificate_pem = forms.CharField(
        widget=forms.Textarea, required=False, strip=False, help_text="Imports an external CA."
    )
    private_key_pem = forms.CharField(
        widget=forms.Textarea, required=False, strip=False, help_text="The imported CA's key."
    )

    class Meta:
        formfield_callback = ascii_formfield
        model = CertificateAuthority
        fields = ["name", "description"]

    def clean(self) -> dict:
        cleaned = super().clean()
        # The API's POST checks with the same function.
        try:
            NewAuthority.from_input(cleaned).check()
        except ValidationError as exc:
            self.add_error(None, exc)
        return cleaned


class IssueClientCertificateForm(forms.Form):
    common_name = forms.CharField(
        max_length=64,
        validators=[validate_no_control_characters],
        help_text="The client identity (CN).",
    )
    validity_days = AsciiIntegerFormField(
        min_value=1, max_value=MAX_VALIDITY_DAYS, required=False, help_text="Default: 365."
    )


class AddFormAdminMixin:
    """Key material is made (or imported) by a dedicated add form and is read-only afterwards."""

    add_form: type | None = None

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            # The declared (non-model) fields come with the form; only these are model fields.
            kwargs.update(form=self.add_form, fields=["name", "description"])
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else []


@admin.register(CertificateAuthority)
class CertificateAuthorityAdmin(AsciiNumbersAdminMixin, AddFormAdminMixin, SimpleHistoryAdmin):
    list_display = ["name", "subject", "is_imported", "has_key", "not_after", "expiry_warning"]
    list_filter = ["is_imported", "key_algorithm"]
    search_fields = ["name", "subject", "serial", "fingerprint_sha256"]
    readonly_fields = [
        "subject",
        "serial",
        "fingerprint_sha256",
        "not_before",
        "not_after",
        "key_algorithm",
        "is_imported",
        "has_key",
        "certificate_pem",
        "created",
        "last_updated",
    ]
    actions = ["issue_client_certificate"]

    add_form = CertificateAuthorityAddForm

    def get_fields(self, request, obj=None):
        if obj is None:
            return [
                "name",
                "description",
                "common_name",
                "key_algorithm",
                "validity_days",
                "certificate_pem",
                "private_key_pem",
            ]
        return ["name", "description", *self.readonly_fields]

    @admin.display(boolean=True, description="private key")
    def has_key(self, authority: CertificateAuthority) -> bool:
        return authority.has_private_key

    @admin.display(boolean=True, description="expiry OK")
    def expiry_warning(self, authority: CertificateAuthority) -> bool:
        return not authority.expires_soon

    def save_model(self, request, obj: CertificateAuthority, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created = NewAuthority.from_input(form.cleaned_data).create()
        obj.pk = created.pk
        obj.refresh_from_db()

    @admin.action(description="Issue a client certificate", permissions=["add"])
    def issue_client_certificate(self, request, queryset):
        def apply(form, authorities):
            for authority in authorities:
                try:
                    with transaction.atomic():
                        certificate = ca.issue_certificate(
                            authority,
                            CertificateKind.CLIENT,
                            form.cleaned_data["common_name"],
                            validity_days=form.cleaned_data.get("validity_days"),
                        )
                except ca.CertificateError as exc:
                    self.message_user(request, f"{authority}: {exc}", messages.ERROR)
                    continue
                link = reverse("admin:exports_app_certificate_bundle", args=[certificate.pk])
                self.message_user(
                    request,
                    format_html(
                        'Issued {} (serial {}). <a href="{}">Download its bundle</a>.',
                        certificate.name,
                        certificate.serial,
                        link,
                    ),
                    messages.SUCCESS,
                )

        return action_with_form(
            self, request, queryset, IssueClientCertificateForm, "Issue a client certificate", apply
        )


class CertificateAddForm(EscapedHelpTextMixin, forms.ModelForm):
    """Issue from a CA, or import a PEM certificate (a server certificate needs its key)."""

    name = forms.CharField(
        max_length=100, required=False, help_text="Default: <kind>-<common name>-<serial>."
    )
    kind = forms.ChoiceField(choices=CertificateKind.choices, initial=CertificateKind.CLIENT)
    authority = forms.ModelChoiceField(
        CertificateAuthority.objects.all(), required=False, help_text="Issue from this CA."
    )
    common_name = forms.CharField(
        max_length=64, required=False, validators=[validate_no_control_characters]
    )
    dns_names = forms.CharField(required=False, help_text="Comma-separated DNS SANs.")
    ip_addresses = forms.CharField(required=False, help_text="Comma-separated IP SANs.")
    validity_days = AsciiIntegerFormField(min_value=1, max_value=MAX_VALIDITY_DAYS, required=False)
    certificate_pem = forms.CharField(
        widget=forms.Textarea, required=False, strip=False, help_text="Imports a certificate."
    )
    private_key_pem = forms.CharField(widget=forms.Textarea, required=False, strip=False)

    class Meta:
        formfield_callback = ascii_formfield
        model = Certificate
        fields = ["name", "description"]

    @staticmethod
    def _split(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    def clean(self) -> dict:
        cleaned = super().clean()
        # The API's POST checks with the same function.
        try:
            self.new_certificate().check()
        except ValidationError as exc:
            self.add_error(None, exc)
        return cleaned

    def new_certificate(self) -> NewCertificate:
        data = {
            **self.cleaned_data,
            "dns_names": self._split(self.cleaned_data.get("dns_names", "")),
            "ip_addresses": self._split(self.cleaned_data.get("ip_addresses", "")),
        }
        return NewCertificate.from_input(data)


class RevokedFilter(admin.SimpleListFilter):
    title = "revoked"
    parameter_name = "revoked"

    def lookups(self, request, model_admin):
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(revoked_at__isnull=True)
        return queryset


@admin.register(Certificate)
class CertificateAdmin(AsciiNumbersAdminMixin, AddFormAdminMixin, SimpleHistoryAdmin):
    list_display = [
        "name",
        "kind",
        "common_name",
        "authority",
        "serial",
        "not_after",
        "expiry_ok",
        "revoked_at",
    ]
    list_filter = ["kind", RevokedFilter, "authority"]
    search_fields = ["name", "common_name", "subject", "serial", "fingerprint_sha256"]
    readonly_fields = [
        "kind",
        "authority",
        "common_name",
        "dns_names",
        "ip_addresses",
        "subject",
        "serial",
        "fingerprint_sha256",
        "not_before",
        "not_after",
        "revoked_at",
        "revocation_reason",
        "has_key",
        "bundle_link",
        "certificate_pem",
        "created",
        "last_updated",
    ]
    actions = ["revoke_certificates", "download_bundle"]

    add_form = CertificateAddForm

    def get_fields(self, request, obj=None):
        if obj is None:
            return [
                "name",
                "description",
                "kind",
                "authority",
                "common_name",
                "dns_names",
                "ip_addresses",
                "validity_days",
                "certificate_pem",
                "private_key_pem",
            ]
        return ["name", "description", *self.readonly_fields]

    def get_urls(self):
        bundle = path(
            "<int:pk>/bundle/",
            self.admin_site.admin_view(self.bundle_view),
            name="exports_app_certificate_bundle",
        )
        return [bundle, *super().get_urls()]

    @admin.display(boolean=True, description="private key")
    def has_key(self, certificate: Certificate) -> bool:
        return certificate.has_private_key

    @admin.display(boolean=True, description="expiry OK")
    def expiry_ok(self, certificate: Certificate) -> bool:
        return not certificate.expires_soon

    @admin.display(description="bundle")
    def bundle_link(self, certificate: Certificate) -> str:
        if certificate.kind != CertificateKind.CLIENT or not certificate.has_private_key:
            return "-"
        url = reverse("admin:exports_app_certificate_bundle", args=[certificate.pk])
        return format_html('<a href="{}">Download client bundle (.tar.gz)</a>', url)

    def save_model(self, request, obj: Certificate, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created = form.new_certificate().create()
        obj.pk = created.pk
        obj.refresh_from_db()

    def has_revoke_permission(self, request) -> bool:
        return request.user.has_perm("exports_app.revoke_certificate")

    def has_bundle_permission(self, request) -> bool:
        return request.user.has_perm("exports_app.download_certificate_bundle")

    @admin.action(description="Revoke selected certificates", permissions=["revoke"])
    def revoke_certificates(self, request, queryset) -> None:
        with transaction.atomic():
            for certificate in queryset:
                ca.revoke_certificate(certificate, f"revoked by {request.user} in the admin")
        self.message_user(request, f"Revoked {queryset.count()} certificate(s).", messages.SUCCESS)

    @admin.action(description="Download client bundle", permissions=["bundle"])
    def download_bundle(self, request, queryset) -> HttpResponse | None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one certificate.", messages.ERROR)
            return None
        return self._bundle_response(request, queryset.get())

    def bundle_view(self, request, pk: int) -> HttpResponse:
        if not self.has_bundle_permission(request):
            raise PermissionDenied
        certificate = get_object_or_404(Certificate, pk=pk)
        response = self._bundle_response(request, certificate)
        if response is None:
            return redirect("admin:exports_app_certificate_change", pk)
        return response

    def _bundle_response(self, request, certificate: Certificate) -> HttpResponse | None:
        try:
            data = bundles.build_client_bundle(certificate)
        except bundles.BundleError as exc:
            self.message_user(request, f"{certificate}: {exc}", messages.ERROR)
            return None
        return bundles.bundle_download(certificate, data)


# -- webhooks (issue 17) -----------------------------------------------------------------------


class WebhookSubscriptionForm(forms.ModelForm):
    secret = forms.CharField(
        required=False,
        min_length=16,
        max_length=200,
        widget=forms.PasswordInput(render_value=False),
        validators=[validate_no_control_characters],
        help_text="Signs each delivery (X-Nbdweb-Signature). Needed for a new webhook; "
        "left empty on a change, the secret stays.",
    )

    class Meta:
        formfield_callback = ascii_formfield
        model = WebhookSubscription
        fields = ["name", "target_url", "event_types", "enabled"]

    def clean_secret(self) -> str:
        secret = self.cleaned_data.get("secret", "")
        if not secret and self.instance.pk is None:
            raise ValidationError("A new webhook needs a secret.")
        if secret and not (secret.isascii() and secret.isprintable() and " " not in secret):
            raise ValidationError("Printable ASCII without spaces.")
        return secret

    def save(self, commit: bool = True) -> WebhookSubscription:
        subscription = super().save(commit=False)
        if self.cleaned_data.get("secret"):
            subscription.set_secret(self.cleaned_data["secret"])
        if commit:
            subscription.save()
        return subscription


@admin.register(WebhookSubscription)
class WebhookSubscriptionAdmin(AsciiNumbersAdminMixin, SimpleHistoryAdmin):
    """The same subscriptions as /api/v1/webhooks/; URL rules in the model's clean()."""

    form = WebhookSubscriptionForm
    list_display = ["name", "target_url", "event_types", "enabled", "owner", "last_updated"]
    list_filter = ["enabled"]
    search_fields = ["name", "target_url"]
    readonly_fields = ["owner", "delivery_log"]

    def get_queryset(self, request):
        return webhooks.subscriptions_of(request.user, super().get_queryset(request))

    @admin.display(description="deliveries")
    def delivery_log(self, subscription: WebhookSubscription) -> str:
        if subscription.pk is None:
            return "-"
        url = reverse("admin:exports_app_webhookdelivery_changelist")
        return format_html(
            '<a href="{}?subscription__id__exact={}">the delivery log</a>', url, subscription.pk
        )

    def save_model(self, request, obj: WebhookSubscription, form, change: bool) -> None:
        if obj.owner_id is None:
            obj.owner = request.user
        super().save_model(request, obj, form, change)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(AsciiNumbersAdminMixin, admin.ModelAdmin):
    """The delivery log: every event sent to a webhook, its attempts and response codes."""

    list_display = [
        "id",
        "subscription",
        "event_kind",
        "state",
        "attempts",
        "response_code",
        "short_error",
        "created",
        "finished",
    ]
    # Only the subscriptions of the deliveries this user may see (get_queryset): the plain
    # related filter listed every subscription's name to anyone who may read the log.
    list_filter = ["state", "event_kind", ("subscription", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["event_id", "error"]
    list_select_related = ["subscription"]
    readonly_fields = [
        "subscription",
        "event_id",
        "event_kind",
        "state",
        "attempts",
        "response_code",
        "error",
        "attempt_log",
        "payload",
        "created",
        "finished",
    ]

    def get_queryset(self, request):
        mine = webhooks.subscriptions_of(request.user, WebhookSubscription.objects.all())
        return super().get_queryset(request).filter(subscription__in=mine)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="error")
    def short_error(self, delivery: WebhookDelivery) -> str:
        return delivery.error[:80]
