package httpapi

import "github.com/dnbd3go/dnbd3go/merger"

// v1API is the current API (reference service since 2024-04, dnbd3-fuse
// on both dnbd3 branches): /v1/File/*, uuid and clusterindex, sparse
// updates, clusters in the replies.
var v1API = &generation{
	name:        "v1",
	prefix:      "/v1/file/",
	mergeAction: "merge",
	uuidKey:     "uuid",
	revisionKey: "revision",
	clusterKey:  "clusterindex",
	statusReply: func(s merger.SessionInfo) any {
		return statusV1{
			ImageName:            s.ImageName,
			MergedClusters:       s.MergedClusters,
			NewImageVersion:      s.NewRevision,
			OriginalImageVersion: s.OriginalRevision,
			State:                s.State,
			TotalClusters:        s.TotalClusters,
		}
	},
	topReply: func(cs []merger.ClusterCount) any {
		out := make([]topV1, len(cs))
		for i, c := range cs {
			out[i] = topV1{ClusterNumber: c.Cluster, Modifications: c.Modifications}
		}
		return out
	},
}

// statusV1 is the reply of GET /v1/File/Status (the reference's
// SessionStatus model).
type statusV1 struct {
	ImageName            string       `json:"imageName"`
	MergedClusters       int          `json:"mergedClusters"`
	NewImageVersion      int          `json:"newImageVersion"`
	OriginalImageVersion int          `json:"originalImageVersion"`
	State                merger.State `json:"state"`
	TotalClusters        int          `json:"totalClusters"`
}

// topV1 is one entry of GET /v1/File/GetTopModifiedBlocks (the
// reference's BlockStatistics model).
type topV1 struct {
	ClusterNumber int    `json:"clusterNumber"`
	Modifications uint32 `json:"modifications"`
}
