"""External agents rotate their credentials with a grace; operators revoke them (agents/eap.py)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('agents', '0012_agent_events'),
    ]

    operations = [
        migrations.AddField(
            model_name='agent',
            name='credentials_revoked_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='agent',
            name='previous_credentials_expire_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='agent',
            name='previous_signing_secret',
            field=models.CharField(blank=True, max_length=128),
        ),
        migrations.AddField(
            model_name='agent',
            name='previous_token_hash',
            field=models.CharField(blank=True, max_length=64),
        ),
        migrations.AddField(
            model_name='agent',
            name='previous_token_prefix',
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.AlterField(
            model_name='agentevent',
            name='action',
            field=models.CharField(choices=[('drain', 'Drain'), ('resume', 'Resume'), ('rotate', 'Rotate'), ('revoke', 'Revoke')], max_length=16),
        ),
    ]
