/*
 * Liveness, the Lazy Pirate way (ZeroMQ Guide, lpclient): heartbeat pings while something is
 * pending, client-side reply timeouts, and what happens when the server goes silent or the
 * connection drops: a new socket, running replies failed with NPCTALK_E_UNAVAILABLE (a half-shown
 * reply cannot be resumed), the blocking call resent at most `retries` times.
 */
#include <stdio.h>

#include "client.h"

/* Milliseconds until service() may have work; -1 when nothing is pending. */
int64_t next_wakeup(const npctalk_client *c) {
    if (!pending(c)) return -1;
    int64_t at = c->last_sent_ms + c->options.heartbeat_ms;
    if (c->last_heard_ms + c->options.timeout_ms + 1 < at) at = c->last_heard_ms + c->options.timeout_ms + 1;
    for (const stream *s = c->streams; s; s = s->next)
        if (s->expires_ms && s->expires_ms < at) at = s->expires_ms;
    int64_t wait = at - now_ms();
    return wait > 0 ? wait : 0;
}

/* The connection is lost (`why`, a sentence without its full stop): new socket, running replies
 * fail, the blocking call is resent or given up. */
static void connection_lost(npctalk_client *c, const char *why) {
    log_line(c, "%s: reconnecting.", why);
    close_socket(c);
    npctalk_status opened = open_socket(c);
    stream *lost = c->streams; /* detached first: their callbacks may start new replies */
    c->streams = NULL;
    c->running = 0;
    while (lost) {
        stream *s = lost;
        lost = s->next;
        char message[640];
        snprintf(message, sizeof message, "%s; reply %s was cut after %zu bytes.", why, s->id, s->text_len);
        report_error(c, s, NPCTALK_E_UNAVAILABLE, message);
    }
    call *k = c->call;
    if (k && !k->finished) {
        if (opened != NPCTALK_OK || k->attempts > c->options.retries) {
            k->finished = 1;
            k->status = opened != NPCTALK_OK ? opened : NPCTALK_E_UNAVAILABLE;
            snprintf(k->error, sizeof k->error, "%s; gave up on %s after %d attempts.", why, k->op, k->attempts);
        } else {
            k->attempts++;
            if (send_frame(c, &k->frame) != NPCTALK_OK) log_line(c, "%s", c->error);
        }
    }
    c->last_heard_ms = c->last_sent_ms = now_ms();
}

static void server_silent(npctalk_client *c) {
    char why[384];
    snprintf(why, sizeof why, "No message from the server at %s for %.1f s (timeout %.1f s)%s", c->endpoint,
             (double)(now_ms() - c->last_heard_ms) / 1000.0, c->options.timeout_ms / 1000.0,
             c->handshake_failed ? "; its handshake failed: " CURVE_HINT : "");
    connection_lost(c, why);
}

void connection_dropped(npctalk_client *c) {
    char why[384];
    if (c->handshake_failed)
        snprintf(why, sizeof why, "The server at %s refused the connection's handshake (%s)", c->endpoint, CURVE_HINT);
    else
        snprintf(why, sizeof why, "The connection to %s dropped (the server stopped, froze or restarted)", c->endpoint);
    connection_lost(c, why);
}

/* Client-side reply timeouts, heartbeats and the silence check. */
void service(npctalk_client *c) {
    for (stream *s = c->streams; s && !c->closing;) {
        stream *next = s->next;
        if (s->expires_ms && now_ms() >= s->expires_ms)
            fail_stream(c, s, NPCTALK_E_TIMEOUT, 1, "Reply %s did not end within its timeout_ms; it was cancelled.",
                        s->id);
        s = next; /* a callback may have started replies: those are at the head, checked next time */
    }
    if (!pending(c) || c->closing) return;
    int64_t now = now_ms();
    if (now - c->last_sent_ms > c->options.timeout_ms) {
        /* The game did not poll for a while (a loading screen, a breakpoint), so nothing asked the
         * server for a sign of life: ask now, and count its silence from here. */
        send_simple(c, "ping", NULL);
        c->last_heard_ms = now;
    } else if (now - c->last_heard_ms > c->options.timeout_ms) {
        server_silent(c);
    } else if (now - c->last_sent_ms >= c->options.heartbeat_ms) {
        send_simple(c, "ping", NULL);
    }
}
