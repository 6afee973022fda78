package httpapi

import (
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"strings"
)

// bearerAuth checks "Authorization: Bearer <token>" in constant time.
type bearerAuth struct {
	sum [sha256.Size]byte // of the token; comparing hashes hides its length
}

// newBearerAuth returns a checker for token, or nil if token is empty
// (no authentication).
func newBearerAuth(token string) *bearerAuth {
	if token == "" {
		return nil
	}
	return &bearerAuth{sum: sha256.Sum256([]byte(token))}
}

// check reports whether r carries the token. If not, it answers 401 with a
// WWW-Authenticate challenge and returns the reason for the log.
func (a *bearerAuth) check(w http.ResponseWriter, r *http.Request) (ok bool, reason string) {
	got, ok := bearerToken(r.Header.Get("Authorization"))
	if ok && a.matches(got) {
		return true, ""
	}
	challenge := `Bearer realm="dnbd3-merger"`
	reason = "no bearer token"
	if ok {
		challenge += `, error="invalid_token"`
		reason = "wrong bearer token"
	}
	w.Header().Set("WWW-Authenticate", challenge)
	writeText(w, http.StatusUnauthorized, "Unauthorized: "+reason)
	return false, reason
}

// matches reports whether tok is the token, in constant time.
func (a *bearerAuth) matches(tok string) bool {
	sum := sha256.Sum256([]byte(tok))
	return subtle.ConstantTimeCompare(sum[:], a.sum[:]) == 1
}

// bearerToken extracts the token from an Authorization header value
// ("Bearer" is matched case-insensitively, RFC 6750).
func bearerToken(h string) (string, bool) {
	scheme, tok, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}
